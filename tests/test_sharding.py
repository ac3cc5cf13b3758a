"""FSDP (`scaling.strategy: fsdp`): two gloo workers on this CPU, without Ray, against one unsharded worker."""

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import run_gloo_workers, tiny_run
from spo_ray.config import ConfigError, validate_run
from spo_ray.trainer import WorkerContext, train

STEPS, CHECKPOINT_AT = 6, 3
COMPARED = ("train/loss", "train/chosen_logp_delta", "train/rejected_logp_delta", "train/grad_norm",
            "probe/chosen_grad_norm", "probe/rejected_grad_norm", "probe/grad_cosine", "eval/loss",
            "eval/reward_accuracy", "eval/accuracy", "eval/mass_correct")


def run_raw(**overrides):
    # Small pass batches, so the sharded workers split them (32 eval pairs: 3 batches of 12; 128 train pairs:
    # 3 reference batches of 48): one worker gets two, the other one and a dropped repeat.
    train_cfg = {"max_steps": STEPS, "log_every": 1, "eval_every": CHECKPOINT_AT, "probe_every": CHECKPOINT_AT,
                 "checkpoint_every": CHECKPOINT_AT, "max_grad_norm": 1.0, "eval_batch_size": 12}
    reference = {"batch_size": 48, **overrides.pop("reference", {})}
    return tiny_run(train=train_cfg, reference=reference, **overrides)


def _worker(rank, world_size, raw, cache_dir, reference_dir, resume_path, out_path):
    """One FSDP worker: train, and on rank 0 save the rows and the step-3 checkpoint state."""
    os.environ["WANDB_MODE"] = "disabled"
    rows, states = [], {}

    def report(row, state):
        rows.append(row)
        if state is not None:
            states[row["step"]] = copy.deepcopy(state)  # the live tensors move on with training

    resume = torch.load(resume_path, weights_only=True) if resume_path else None
    train(validate_run(raw).run_config(), cache_dir=cache_dir, reference_dir=reference_dir, report=report,
          resume=resume, context=WorkerContext(rank=rank, world_size=world_size, strategy="fsdp"))
    if rank == 0:
        torch.save({"rows": rows, "states": states}, out_path)


def run_fsdp(raw, cache_dir, reference_dir, out_path, resume_path=None):
    run_gloo_workers(_worker, (raw, cache_dir, str(reference_dir), resume_path, str(out_path)),
                     Path(out_path).parent)
    return torch.load(out_path, weights_only=True)


def run_single(raw, cache_dir, reference_dir, resume=None):
    rows, states = [], {}

    def report(row, state):
        rows.append(row)
        if state is not None:
            states[row["step"]] = copy.deepcopy(state)  # the live tensors move on with training

    train(validate_run(raw).run_config(), cache_dir=cache_dir, reference_dir=str(reference_dir), report=report,
          resume=resume)
    return {"rows": rows, "states": states}


def by_step(rows):
    return {row["step"]: row for row in rows}


def assert_same_rows(sharded_rows, single_rows, steps):
    sharded, single = by_step(sharded_rows), by_step(single_rows)
    for step in steps:
        for key in COMPARED:
            if key in single[step]:
                assert sharded[step][key] == pytest.approx(single[step][key], rel=2e-3, abs=2e-4), (step, key)


@pytest.mark.parametrize("overrides", [{"reference": {"cache": True}}, {"reference": {"cache": False}},
                                       {"model": {"lora": {"r": 4}}}],
                         ids=["reference-cache", "reference-model", "lora"])
def test_two_fsdp_workers_follow_the_one_worker_run_and_checkpoints_move_between_them(tmp_path, init_cache,
                                                                                       overrides):
    """2 sharded workers × 8 pairs = 1 unsharded worker × 16 pairs: same losses, gradient norms, probe and
    evaluation at every step; the sharded run's checkpoint is a full state dict that resumes an unsharded run,
    and an unsharded checkpoint resumes a sharded run, both onto the uninterrupted trajectory. With the
    reference from the cache (built by the sharded workers together), as a sharded model run every batch,
    and with LoRA adapters on a sharded base."""
    raw = run_raw(**overrides)
    single = run_single(raw, init_cache, tmp_path / "ref_single")
    sharded = run_fsdp(raw, init_cache, tmp_path / "ref_sharded", tmp_path / "sharded.pt")

    assert sorted(by_step(sharded["rows"])) == sorted(by_step(single["rows"])) == list(range(1, STEPS + 1))
    assert_same_rows(sharded["rows"], single["rows"], range(1, STEPS + 1))
    assert all(math.isfinite(by_step(sharded["rows"])[CHECKPOINT_AT][k]) for k in COMPARED)

    # The sharded checkpoint is the full model: same keys, shapes and (within float error) values.
    sharded_state, single_state = sharded["states"][CHECKPOINT_AT], single["states"][CHECKPOINT_AT]
    assert sharded_state["step"] == single_state["step"] == CHECKPOINT_AT
    assert sharded_state["model"].keys() == single_state["model"].keys()
    for name, value in single_state["model"].items():
        assert not hasattr(sharded_state["model"][name], "to_local"), name  # a plain tensor, not a shard
        # Adam turns float noise in near-zero gradients into updates of up to lr: 2e-5 here, on 0.03% of one
        # tensor; a misplaced shard would be off by the weights themselves (~0.02).
        assert torch.allclose(sharded_state["model"][name], value, rtol=1e-3, atol=1e-4), name

    # Sharded checkpoint → unsharded run, and unsharded checkpoint → sharded run.
    resumed_single = run_single(raw, init_cache, tmp_path / "ref_single", resume=sharded_state)
    assert_same_rows(resumed_single["rows"], single["rows"], range(CHECKPOINT_AT + 1, STEPS + 1))
    torch.save(single_state, tmp_path / "single_state.pt")
    resumed_sharded = run_fsdp(raw, init_cache, tmp_path / "ref_sharded", tmp_path / "resumed.pt",
                               resume_path=str(tmp_path / "single_state.pt"))
    assert sorted(by_step(resumed_sharded["rows"])) == list(range(CHECKPOINT_AT + 1, STEPS + 1))
    assert_same_rows(resumed_sharded["rows"], single["rows"], range(CHECKPOINT_AT + 1, STEPS + 1))


def test_fsdp_refuses_the_one_step_estimator_in_one_line():
    raw = {"loss": {"name": "spo", "spo_estimator": "one_step"}, "scaling": {"num_workers": 2, "strategy": "fsdp"}}
    with pytest.raises(ConfigError, match=r"^loss.spo_estimator: one_step cannot run with scaling.strategy: fsdp"):
        validate_run(raw)
    with pytest.raises(ConfigError, match=r"scaling.strategy"):
        validate_run({"scaling": {"strategy": "zero3"}})
