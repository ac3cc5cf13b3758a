#!/usr/bin/env bash
# Reproduces docs/results.md: the sweeps that ask the paper's questions, then a report for each.
#   bash scripts/results.sh            # ~32 minutes on a 2-CPU laptop, ~20 more for Claim 5's three sweeps;
#                                      # writes results/<name>/ and results/wall_times.txt (one line per sweep)
# An experiment that already exists is resumed (finished trials are kept), so the script can be re-run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STORE=${STORE:-results}
mkdir -p "$STORE"

run() {
    local name=$1; shift
    local resume=()
    [ -f "$STORE/$name/tuner.pkl" ] && resume=(--resume)
    local start; start=$(date +%s)
    "$PY" -m spo_ray.sweep "$@" --storage-path "$STORE" --name "$name" "${resume[@]}"
    local code=$?
    echo "$name: $(( $(date +%s) - start )) s, exit $code" | tee -a "$STORE/wall_times.txt"
    [ "$code" -le 1 ] && "$PY" -m analysis.report "$STORE/$name"
}

# Claim 1 and 4 (likelihood displacement; SPO keeps chosen up): the default demo, then widened.
run beta      sweeps/beta.yaml
run beta_wide sweeps/beta.yaml --set 'loss.beta={grid: [0.05, 0.1, 0.3, 0.5]}' 'train.seed={grid: [0, 1, 2]}'
# SPO's penalty weight, from λ = 0 (DPO) up.
run lambda    sweeps/lambda.yaml
# Claim 2 (sensitivity to the initialization).
run init      sweeps/init.yaml
# Claim 3 (mass moves to other answers) across losses: IPO, DPOP, SimPO, SPO over SimPO; then RPO.
run baselines sweeps/baselines.yaml
run rpo       sweeps/baselines.yaml --set loss.name=dpo 'loss.nll_weight={grid: [1.0]}'
# Claim 5 (SFT-free starts): SPO's reference and one_step estimators from base and sft_short; DPO and RPO
# on the same cells; then one_step over its inner step α, λ and ε from base.
run sft_free     sweeps/sft_free.yaml
run sft_free_dpo sweeps/sft_free.yaml --set loss.name=dpo loss.spo_estimator=reference 'loss.nll_weight={grid: [0.0, 1.0]}'
run one_step     sweeps/one_step.yaml
