"""W&B tracking: offline runs hold what was logged, failures never escape, disabled/rank>0 write nothing.

No test touches the network: modes are explicit or resolved with credentials removed, and every wandb
directory is under tmp_path.
"""

from __future__ import annotations

import json

import pytest

from conftest import read_wandb_records
from spo_ray import tracking
from spo_ray.tracking import Tracker, WandbRun, resolve_mode, start_run

SECRET = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No credentials, no netrc, and wandb's config/cache/data folders inside tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def test_offline_run_records_config_metrics_and_status(tmp_path, capsys):
    tracker = start_run(
        {"mode": "offline", "project": "spo-test", "tags": ["nightly"]},
        run_name="trial_0001",
        group="beta-sweep",
        config={"loss": "spo", "beta": 0.1, "spo_lambda": 1.0},
        dir=tmp_path,
    )
    assert isinstance(tracker, WandbRun)
    for step, loss in [(0, 0.69), (10, 0.5), (20, 0.25)]:
        tracker.log({"train/loss": loss, "train/reward_accuracy": 0.5 + step / 100}, step=step)
    tracker.finish("TERMINATED")

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    hint = [line for line in capsys.readouterr().out.splitlines() if "offline run saved" in line]
    assert hint == [f"wandb: offline run saved in {run_dirs[0]}; sync it later with: wandb sync {run_dirs[0]}"]

    records = read_wandb_records(next(run_dirs[0].glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["beta"] == 0.1 and config["loss"] == "spo"
    assert run.run_group == "beta-sweep" and run.display_name == "trial_0001"
    assert list(run.tags) == ["nightly", "spo"]

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    assert history[10]["train/loss"] == 0.5
    assert history[20]["train/reward_accuracy"] == pytest.approx(0.7)

    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    assert summary["trial_status"] == "TERMINATED"


def test_failing_wandb_init_gives_a_quiet_noop_tracker(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", SECRET)

    def broken_init(**kwargs):
        raise RuntimeError(f"cannot reach server with key {SECRET}")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = start_run({"mode": "offline"}, run_name="t", group="g", config={"loss": "dpo"}, dir=tmp_path)
    tracker.log({"train/loss": 1.0}, step=0)
    tracker.finish("ERROR")

    assert not tracker.enabled
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb init failed" in err[0]
    assert SECRET not in err[0]


class FlakyRun:
    """A wandb run whose log call fails once the server goes away."""

    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, metrics, step):
        if step > 0:
            raise ConnectionError("server went away")
        self.logged.append((step, metrics))

    def finish(self, exit_code=0):
        self.finished = True


def test_failing_log_turns_tracking_off_after_one_warning(capsys):
    run = FlakyRun()
    tracker = WandbRun(run)
    for step in range(3):
        tracker.log({"train/loss": 1.0}, step=step)
    tracker.finish("TERMINATED")

    assert run.logged == [(0, {"train/loss": 1.0})]
    assert not run.finished
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb log failed" in err[0] and "server went away" in err[0]


def test_finish_records_the_trial_status_in_the_summary():
    run = FlakyRun()
    WandbRun(run).finish("DIVERGED")
    assert run.summary["trial_status"] == "DIVERGED" and run.finished


def test_disabled_mode_and_nonzero_ranks_never_call_wandb(tmp_path, monkeypatch):
    import wandb

    def must_not_run(**kwargs):
        raise AssertionError("wandb.init called")

    monkeypatch.setattr(wandb, "init", must_not_run)
    disabled = start_run({"mode": "disabled"}, run_name="t", group="g", config={}, dir=tmp_path / "a")
    worker = start_run({"mode": "offline"}, run_name="t", group="g", config={}, dir=tmp_path / "b", rank=1)
    for tracker in (disabled, worker):
        assert type(tracker) is Tracker
        tracker.log({"train/loss": 1.0}, step=0)
        tracker.finish("TERMINATED")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_auto_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    assert resolve_mode("auto") == "offline"
    assert resolve_mode(None) == "offline"

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + SECRET + "\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert resolve_mode("auto") == "online"

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ValueError, match="wandb.mode"):
        resolve_mode("sometimes")


def test_loss_is_added_to_the_tags_once():
    assert tracking._tags(["a", "spo"], ["b"], "spo") == ["a", "spo", "b"]
    assert tracking._tags(None, [], None) == []


def test_wandb_mode_in_the_environment_overrides_the_config(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init called under WANDB_MODE=disabled"))
    assert type(start_run({"mode": "offline"}, run_name="t", group="g", config={}, dir=tmp_path / "a")) is Tracker
    assert not (tmp_path / "a").exists()
    for spelled, mode in (("offline", "offline"), ("dryrun", "offline"), ("online", "online"), ("run", "online")):
        monkeypatch.setenv("WANDB_MODE", spelled)
        assert resolve_mode("disabled") == mode
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of"):
        resolve_mode("auto")


def test_a_trials_run_carries_its_processs_environment_in_its_config(tmp_path):
    """What produced a trial's numbers goes with them to W&B: the versions and machine of the process that
    trained it (a worker node's, which may differ from the driver's)."""
    import torch

    from conftest import tiny_run
    from spo_ray.config import validate_sweep
    from spo_ray.distributed import start_tracking
    from spo_ray.environment import describe

    raw = {**tiny_run(), "name": "env", "storage_path": str(tmp_path / "results"), "wandb": {"mode": "offline"}}
    sweep, _ = validate_sweep(raw)
    tracker = start_tracking(sweep, "trial_0", rank=0)
    tracker.finish("TERMINATED")
    [run_dir] = (tmp_path / "results" / "env" / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run_dir.glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["environment.torch"] == torch.__version__
    assert config["environment.commit"] == describe()["commit"]
    assert config["loss"] == "dpo"
