#!/usr/bin/env bash
# The self-sampled-pairs experiment of docs/results.md on SmolLM2-135M-Instruct, timed end to end:
# DPO and SPO, SimPO, RPO (DPO + NLL) × 3 seeds, then DPO and SPO from the SFT-on-own-samples init.
#   bash scripts/arith_smollm2.sh      # writes $STORE/arith-smollm2*/ and $STORE/arith_wall_times.txt
# The four sweeps share one storage path, so the samples (and each init's evaluation) are made once, by the
# first sweep; an experiment that already exists is resumed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STORE=${STORE:-results}
SWEEP=sweeps/arith_smollm2.yaml
mkdir -p "$STORE"
begin=$(date +%s)

WALL_TIMES="$STORE/arith_wall_times.txt"
source scripts/run_sweep.sh

run arith-smollm2
run arith-smollm2-simpo --set loss.name=simpo loss.beta=2.0 loss.gamma=1.0
run arith-smollm2-rpo   --set loss.name=dpo loss.nll_weight=1.0
run arith-smollm2-sft   --set model.sft_steps=24
echo "all four: $(( $(date +%s) - begin )) s" | tee -a "$WALL_TIMES"
"$PY" scripts/arith_smollm2.py "$STORE"
