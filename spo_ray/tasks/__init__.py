"""Where a run's pairs, tokenizer, starting weights and evaluator come from: one module per `data.source`.

    arithmetic.py   data.source arithmetic: the built-in task: generated pairs, character tokenizer,
                    the built-in inits (scratch, base, sft_short, sft_long) and the exact evaluator
    chat_arithmetic.py  data.source chat_arithmetic: arithmetic questions as chat for instruct models,
                    answers read by their final number, greedy accuracy
    gsm8k.py        data.source gsm8k: GSM8K pairs and split, the `gsm8k-local-small` model, accuracy
    pairs.py        data.source files | hub: TRL-style pair files or hub datasets, validated and split
                    (GSM8K's pairs go through the same validation)
    task.py         the `Task` every source returns
    sampled.py      data.sampled_pairs on any source that can check answers: the model's own samples,
                    verified and paired (and the SFT-on-own-samples init)

Each source has `load_task(config, policy_path, reference_path) -> Task`. To add one, copy the closest
module, add its name to `SOURCES` below and to `DataConfig.source` in `spo_ray/config.py`; a model that a
source builds itself goes into `model_path`. Imports point down only: this registry → sources → `task`,
`spo_ray.models`, `spo_ray.decoding`, `spo_ray.config` (gsm8k → pairs for the shared validation).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from spo_ray.config import ConfigError, RunConfig, did_you_mean
from spo_ray.models import PACKAGED_GGUF, gguf_init, is_gguf
from spo_ray.storage import local_mirror
from spo_ray.tasks import arithmetic, chat_arithmetic, gsm8k, pairs, sampled
from spo_ray.tasks.task import Task

# data.source → the module whose `load_task` makes that source's Task.
SOURCES = {"arithmetic": arithmetic, "chat_arithmetic": chat_arithmetic, "gsm8k": gsm8k, "files": pairs,
           "hub": pairs}


def model_path(name: str, key: str, config: RunConfig, cache_dir: str, progress: bool = False) -> str:
    """`model.init` / `model.reference` (`key`) → the folder or hub id of the weights: a model a source builds
    by name, or a GGUF file (`.gguf`, or a packaged one such as `smollm2-135m-instruct`) converted into a
    model folder (both into `cache_dir`, once), else the name as given (a hub id, or a folder such as
    another run's output)."""
    source = config.data.source
    if name in arithmetic.INIT_NAMES:
        if source != "arithmetic":  # they speak the arithmetic task's character tokenizer only
            raise ConfigError(f"{key}: {name!r} is a built-in init of the arithmetic task; with data.source "
                              f"{source} give a hub id, a local model folder or {gsm8k.LOCAL_MODEL_NAME!r}")
        return str(arithmetic.init_for(name, config, cache_dir, progress))
    if name == gsm8k.LOCAL_MODEL_NAME and source != "arithmetic":
        return str(gsm8k.local_model_for(config, cache_dir, progress))
    if is_gguf(name):
        try:
            return str(gguf_init(name, config.model.dtype, cache_dir))
        except ConfigError as error:  # name the key it came from (init or reference)
            raise ConfigError(str(error).replace("model.init:", f"{key}:", 1)) from None
    check_not_a_typo(name, key)
    return name


def built_in_models() -> list[str]:
    """The names `model.init` (and `model.reference`, `data.sampled_pairs.sampler`) takes beside paths and hub ids."""
    return [*arithmetic.INIT_NAMES, gsm8k.LOCAL_MODEL_NAME, *PACKAGED_GGUF]


def check_not_a_typo(name: str, key: str) -> None:
    """Refuse a model name that is a near miss of a built-in one and nothing else: no local path, no owner/name
    hub id (hub ids cannot be checked offline, so any other name goes to `transformers` as given)."""
    if "/" in name or ":" in name or Path(name).expanduser().exists():
        return
    if difflib.get_close_matches(name, built_in_models(), n=1, cutoff=0.8):
        raise ConfigError(f"{key}: '{name}' is neither a built-in model nor a local path "
                          f"({did_you_mean(name, built_in_models())})")


def check_init_steps(config: RunConfig) -> None:
    """`model.init_steps` names built-in inits: a key that names none would train nothing."""
    trained = [*arithmetic.INIT_NAMES, gsm8k.LOCAL_MODEL_NAME]  # the ones built here, by training steps
    for name in config.model.init_steps:
        if name not in trained:
            raise ConfigError(f"model.init_steps.{name}: not a built-in init ({did_you_mean(name, trained)})")


def load_task(config: RunConfig, cache_dir: str, progress: bool = False, samples_dir: str | None = None) -> Task:
    """The `Task` of a run config: its starting weights (built into `cache_dir` where a source builds them;
    a storage URI is used through this node's local mirror of it) and `data.source`'s pairs, tokenizer and
    evaluator. With `data.sampled_pairs`, the pairs are the sampler's, read from (or sampled into)
    `samples_dir`; without a `samples_dir`, the source's own pairs (the sweep driver samples separately)."""
    cache_dir = local_mirror(cache_dir)
    check_init_steps(config)
    policy_path = model_path(config.model.init, "model.init", config, cache_dir, progress)
    reference_path = (model_path(config.model.reference, "model.reference", config, cache_dir, progress)
                      if config.model.reference else policy_path)
    task = SOURCES[config.data.source].load_task(config, policy_path, reference_path)
    if config.data.sampled_pairs is None or samples_dir is None:
        return task
    job = sampling_job(task, config, cache_dir, progress)
    return sampled.with_sampled_pairs(task, config, job, samples_dir, cache_dir, progress)


def sampling_job(task: Task, config: RunConfig, cache_dir: str, progress: bool = False) -> sampled.SamplingJob:
    """The sample table `data.sampled_pairs` asks of `task` (see `spo_ray.tasks.sampled`)."""
    spec = config.data.sampled_pairs
    sampler = spec.sampler or config.model.init
    path = model_path(sampler, "data.sampled_pairs.sampler", config, local_mirror(cache_dir), progress)
    return sampled.sampling_job(task, config, path)


def evaluate_init(config: RunConfig, cache_dir: str) -> tuple[Task, dict[str, float]]:
    """The task's evaluation of `model.init` before any training, as a trial evaluates: (task, metrics)."""
    import torch

    from spo_ray.models import load_causal_lm

    task = load_task(config, cache_dir)
    model = load_causal_lm(task.policy_path, config.model, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return task, task.evaluate(model)


__all__ = ["SOURCES", "Task", "load_task", "sampling_job", "model_path", "evaluate_init", "ConfigError"]
