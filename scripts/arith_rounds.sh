#!/usr/bin/env bash
# The self-training-rounds experiment of docs/results.md on SmolLM2-135M-Instruct, timed end to end: 3 rounds of
# DPO and SPO, then SimPO and RPO (DPO + NLL), × 3 seeds, reference_update: previous.
#   bash scripts/arith_rounds.sh       # writes $STORE/arith-rounds*/ and $STORE/arith_rounds_wall_times.txt
# The sweeps share one storage path, so round 1's samples and the init's evaluation are made once, by the first
# sweep; an experiment that already exists is resumed. PARALLEL=1 runs the SimPO and RPO sweeps side by side,
# one trial each (each its own local Ray instance: a core each on a 2-core machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STORE=${STORE:-results}
SWEEP=sweeps/arith_smollm2_rounds.yaml
mkdir -p "$STORE"
begin=$(date +%s)

WALL_TIMES="$STORE/arith_rounds_wall_times.txt"
source scripts/run_sweep.sh

run arith-rounds
if [ "${PARALLEL:-0}" = 1 ]; then
    run arith-rounds-simpo --set loss.name=simpo loss.beta=2.0 loss.gamma=1.0 tune.max_concurrent_trials=1 &
    run arith-rounds-rpo   --set loss.name=dpo loss.nll_weight=1.0 tune.max_concurrent_trials=1 &
    wait
else
    run arith-rounds-simpo --set loss.name=simpo loss.beta=2.0 loss.gamma=1.0
    run arith-rounds-rpo   --set loss.name=dpo loss.nll_weight=1.0
fi
echo "all: $(( $(date +%s) - begin )) s" | tee -a "$WALL_TIMES"
"$PY" scripts/arith_rounds.py "$STORE"
