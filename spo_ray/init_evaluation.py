"""The task's evaluation of the starting weights (step 0 under `train.eval_on_start`): once per sweep.

Greedy accuracy of a 135M-parameter model on a few hundred questions takes about a minute on a CPU core,
and every trial of a sweep that starts from one init would spend it on the same numbers: the evaluation of
the initial weights is a pure function of (those weights, the task's data and evaluation settings, the model
settings). So, like the reference log-probs (`spo_ray.reference`), it is computed by the first trial that
needs it — the others wait on the build lock — and stored as a JSON file in the shared cache beside the
inits (`<cache_dir>/evaluations/`), under a key of those inputs; a later sweep from the same init reads it too. Only the task's own evaluator is shared this way; the preference metrics of step 0
depend on the trial's loss and are computed by each trial (they are cheap).
"""

from __future__ import annotations

import json
from typing import Callable

from spo_ray import storage
from spo_ray.config import RunConfig, to_plain
from spo_ray.reference import fingerprint, model_identity

FORMAT = 1


def evaluation_key(policy_path: str, config: RunConfig) -> str:
    """What the initial evaluation depends on: the weights, the data section (the questions and how they are
    asked and judged), the model section (dtype, attention) and the evaluation batch budget."""
    return fingerprint(model_identity(policy_path), to_plain(config.data), to_plain(config.model),
                       config.train.eval_batch_tokens, FORMAT)


def evaluations_dir(cache_dir: str) -> str:
    return storage.join(cache_dir, "evaluations")


def evaluation_path(directory: str, key: str) -> str:
    return storage.join(directory, f"init-eval-{key}.json")


def _read(location: str) -> dict | None:
    try:
        stored = json.loads(storage.read_bytes(location))
        return stored["metrics"] if stored.get("format") == FORMAT else None
    except Exception:  # missing or unreadable: evaluate again
        return None


def shared_initial_evaluation(evaluate: Callable, directory: str, key: str) -> Callable:
    """`evaluate(model)` for the initial weights, computed once per key (`storage.built_once`) and read back by
    every other caller; `evaluate` itself for everything after step 0."""
    location = evaluation_path(directory, key)

    def initial(model) -> dict:
        def build() -> dict:
            metrics = evaluate(model)
            storage.write_bytes(location, json.dumps({"format": FORMAT, "metrics": metrics}).encode())
            return metrics
        metrics, hit = storage.built_once(f"init-eval-{key}", directory, lambda: _read(location), build)
        print(f"evaluation of the initial weights: {'read from' if hit else 'computed into'} {location}")
        return metrics
    return initial
