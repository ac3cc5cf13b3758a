# Sourced by the experiment scripts (arith_smollm2.sh, arith_rounds.sh): `run NAME [--set ...]` runs (or resumes,
# when the experiment exists) `$SWEEP` as experiment NAME under $STORE, appends its wall time and exit code to
# $WALL_TIMES, and writes its report when its trials ran (exit 0 or 1). Needs PY, STORE, SWEEP, WALL_TIMES.
run() {
    local name=$1; shift
    local resume=()
    [ -f "$STORE/$name/tuner.pkl" ] && resume=(--resume)
    local start; start=$(date +%s)
    "$PY" -m spo_ray.sweep "$SWEEP" --storage-path "$STORE" --name "$name" "${resume[@]}" "$@"
    local code=$?
    echo "$name: $(( $(date +%s) - start )) s, exit $code" | tee -a "$WALL_TIMES"
    [ "$code" -le 1 ] && "$PY" -m analysis.report "$STORE/$name"
}
