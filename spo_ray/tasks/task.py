"""What every source of pairs hands the trainer: a `Task`.

Each source module in this folder (`arithmetic`, `gsm8k`, `pairs` for files and the hub) has a
`load_task(config, policy_path, reference_path) -> Task`; `spo_ray.tasks.load_task` picks the module by
`data.source` and first turns `model.init` / `model.reference` into the weights' folder or hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from spo_ray.sampling import SamplingSource


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
    sampling: SamplingSource | None = None   # prompts with answers and a checker: data.sampled_pairs can run
    metrics: dict[str, float] = field(default_factory=dict)  # about the data (e.g. sampler/*), in every reported row
