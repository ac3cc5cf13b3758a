"""Shared fixtures: tiny configs that train in seconds, and no W&B network traffic anywhere."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_DATA = {"arithmetic": {"train_pairs": 128, "eval_pairs": 32, "eval_problems": 16,
                            "pretrain_examples": 2000, "sft_examples": 1000}}


def tiny_run(**sections) -> dict:
    """A run config (plain dict) on the arithmetic task from an untrained model: seconds on a CPU."""
    raw = {
        "loss": {"name": "dpo", "beta": 0.1},
        "model": {"init": "scratch", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "data": TINY_DATA,
        "train": {"max_steps": 6, "batch_size": 16, "eval_every": 3, "probe_every": 3, "log_every": 3,
                  "learning_rate": 1e-3, "warmup_steps": 0, "num_threads": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


@pytest.fixture(scope="session")
def init_cache(tmp_path_factory):
    """One init cache for the whole session, so built-in inits are built once."""
    return str(tmp_path_factory.mktemp("init_cache"))
