#!/usr/bin/env bash
# One command for an NVIDIA GPU machine (H100/H200; no network there): the GPU-marked tests and the
# throughput benchmark. PyTorch and transformers must be installed; Ray, W&B and TRL are not needed.
# Missing pure-Python packages (pydantic on the lent machines) can be carried as wheels in .whl/:
#   bash scripts/gpu_check.sh            # finishes in a few minutes
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spo_site .whl/*.whl
  export PYTHONPATH=/tmp/spo_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -o addopts="" || status=1
$PY benchmarks/gpu_throughput.py || status=1
exit $status
