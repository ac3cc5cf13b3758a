"""Search beyond the grid (issue 23), without Ray: what PBT's exploit and explore do to a run, `schedule`,
the Optuna searcher scored over seeds, PBT's state across a resume, and the lineage the analysis draws.

The Ray end-to-end runs (a PBT sweep, an Optuna sweep) are in tests/test_sweep.py (slow)."""

import io

import pandas as pd
import pytest
import torch

from conftest import tiny_run
from spo_ray.config import validate_run
from spo_ray.trainer import lr_lambda, train

# Wall time and throughput differ between two runs of the same computation; nothing else may.
UNTIMED = ("train/tokens_per_s", "wall_time_s")


def spo_run(**train_keys) -> dict:
    return tiny_run(loss={"name": "spo", "spo_lambda": 1.0},
                    train={"max_steps": 8, "log_every": 1, "eval_every": 4, "probe_every": 4,
                           "checkpoint_every": 4, **train_keys})


def saved(state: dict) -> dict:
    """The state as a checkpoint holds it: written and read back (the live one changes as training goes on)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run(raw, cache_dir, reference_dir, resume=None):
    """Every reported row and every checkpoint state, by step."""
    rows, states = [], {}

    def report(row, state):
        rows.append({k: v for k, v in row.items() if k not in UNTIMED})
        if state is not None:
            states[state["step"]] = saved(state)
    # A fresh copy each time: AdamW's load_state_dict keeps the tensors it is given and updates them in place.
    train(validate_run(raw), cache_dir=cache_dir, reference_dir=str(reference_dir), report=report,
          resume=saved(resume) if resume else None)
    return {row["step"]: row for row in rows}, states


@pytest.fixture(scope="module")
def donor(init_cache, tmp_path_factory):
    """A run of 8 steps with λ = 1 and its checkpoints at steps 4 and 8: the trial PBT copies."""
    reference_dir = tmp_path_factory.mktemp("donor_ref")
    rows, states = run(spo_run(), init_cache, reference_dir)
    return rows, states, reference_dir


def test_a_run_started_from_another_runs_checkpoint_continues_its_trajectory(donor, init_cache):
    """PBT's exploit: weights, AdamW state, schedule and step all come from the checkpoint, and the data
    position follows from the step, so the receiver's steps 5–8 are the donor's own steps 5–8."""
    rows, states, reference_dir = donor
    received, _ = run(spo_run(), init_cache, reference_dir, resume=states[4])
    assert sorted(received) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert received[step] == rows[step], step


def test_a_mutated_lambda_and_learning_rate_reach_the_loss_and_the_optimizer_from_the_next_step(donor, init_cache):
    """PBT's explore: the receiver runs on with λ = 2.5 and twice the learning rate. Its first step is the
    donor's step 5 (same weights, same batch), so the base loss and the penalty P are the donor's and the
    loss differs by exactly (2.5 − 1)·P; the learning rate is the new base times the schedule's factor."""
    rows, states, reference_dir = donor
    donor_lr = spo_run()["train"]["learning_rate"]
    mutated = {**spo_run(learning_rate=2 * donor_lr), "loss": {"name": "spo", "spo_lambda": 2.5}}
    received, _ = run(mutated, init_cache, reference_dir, resume=states[4])
    assert [rows[s]["train/spo_lambda"] for s in (4, 5)] == [1.0, 1.0]
    assert [received[s]["train/spo_lambda"] for s in (5, 6, 7, 8)] == [2.5] * 4
    penalty = rows[5]["train/spo_penalty"]
    assert penalty > 0  # the test means something only while the penalty is on
    # float32 losses of size ~1: the two runs add the same terms, so they agree to a few ulps
    assert received[5]["train/loss"] - rows[5]["train/loss"] == pytest.approx(1.5 * penalty, rel=1e-5, abs=1e-6)
    assert received[5]["train/chosen_logp_delta"] == pytest.approx(rows[5]["train/chosen_logp_delta"], abs=1e-6)
    factor = lr_lambda("cosine", 0, 8)  # the tiny run: cosine over 8 steps, no warm-up
    assert received[5]["train/learning_rate"] == pytest.approx(2 * donor_lr * factor(4), rel=1e-12)
    assert rows[5]["train/learning_rate"] == pytest.approx(donor_lr * factor(4), rel=1e-12)
    assert received[6]["train/learning_rate"] == pytest.approx(2 * donor_lr * factor(5), rel=1e-12)


def test_a_schedule_replays_what_an_exploit_with_mutated_values_did(donor, init_cache):
    """`schedule` entries at step 4 give the same run as the donor's first 4 steps followed by a receiver
    resumed from step 4 with the new values: a schedule PBT found can be re-run, with other seeds too."""
    rows, states, reference_dir = donor
    lr = spo_run()["train"]["learning_rate"]
    mutated = {**spo_run(learning_rate=2 * lr), "loss": {"name": "spo", "spo_lambda": 2.5}}
    received, _ = run(mutated, init_cache, reference_dir, resume=states[4])
    scheduled = {**spo_run(), "schedule": {"loss.spo_lambda": [[0, 1.0], [4, 2.5]],
                                           "train.learning_rate": [[4, 2 * lr]]}}
    replayed, _ = run(scheduled, init_cache, reference_dir)
    assert [replayed[s] for s in (1, 2, 3, 4)] == [rows[s] for s in (1, 2, 3, 4)]
    for step in (5, 6, 7, 8):
        assert replayed[step] == pytest.approx(received[step], rel=1e-6, abs=1e-7), step
