"""What a run trains on: a tokenizer, text pairs, the weights to start from, and the task's evaluator.

`load_task(config)` is the one place that turns the `data` and `model` sections of a run config into
those pieces, whether the pairs come from the built-in arithmetic task or from files / the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from spo_ray.config import ConfigError, RunConfig


@dataclass
class Task:
    name: str
    tokenizer: object
    train_pairs: list[dict]           # {"prompt", "chosen", "rejected"} texts
    eval_pairs: list[dict]
    policy_path: str                  # local folder or hub id the policy starts from
    reference_path: str               # the frozen reference (by default the same weights)
    evaluate: Callable | None = None  # model -> {"accuracy": ..., ...}, logged as eval/*
    notes: list[str] = field(default_factory=list)


def arithmetic_config(config: RunConfig):
    from spo_ray.tasks.arithmetic import ArithmeticConfig
    return ArithmeticConfig(**{**config.data.arithmetic.model_dump(),
                               "operations": tuple(config.data.arithmetic.operations)})


def builtin_model_kwargs(config: RunConfig) -> dict:
    m = config.model
    return {"arch": m.arch, "hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads}


def load_task(config: RunConfig, cache_dir: str, progress: bool = False) -> Task:
    if config.data.source == "arithmetic":
        return _arithmetic_task(config, cache_dir, progress)
    from spo_ray.pairs import load_pair_task  # real datasets: files, the hub, GSM8K
    return load_pair_task(config, cache_dir, progress)


def _arithmetic_task(config: RunConfig, cache_dir: str, progress: bool) -> Task:
    from spo_ray.models import INIT_NAMES, build_arithmetic_init
    from spo_ray.tasks import arithmetic
    from spo_ray.tasks.evaluation import evaluate_task

    task_cfg = arithmetic_config(config)
    tokenizer = arithmetic.make_tokenizer()

    def init_path(name: str) -> str:
        if name in INIT_NAMES:
            steps = config.model.init_steps
            return str(build_arithmetic_init(name, task_cfg, builtin_model_kwargs(config), cache_dir,
                                             steps=steps.get(name), base_steps=steps.get("base"),
                                             progress=progress))
        return name  # a folder saved earlier, e.g. another run's output

    policy_path = init_path(config.model.init)
    reference_path = init_path(config.model.reference) if config.model.reference else policy_path
    problems = arithmetic.eval_problems(task_cfg)
    return Task(
        name="arithmetic",
        tokenizer=tokenizer,
        train_pairs=arithmetic.preference_pairs(task_cfg, "train"),
        eval_pairs=arithmetic.preference_pairs(task_cfg, "eval"),
        policy_path=policy_path,
        reference_path=reference_path,
        evaluate=lambda model: evaluate_task(model, tokenizer, problems, task_cfg),
    )


__all__ = ["Task", "load_task", "ConfigError"]
