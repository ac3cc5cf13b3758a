"""Weights & Biases tracking for one trial: a run per trial, grouped by sweep, tagged by loss.

Tracking is an observer, never a participant: any exception from wandb (init, log, finish) is caught,
reported as one warning line, and the tracker turns itself off, so a W&B outage cannot fail a trial.

Mode `auto` (the default) goes online only when credentials exist (`WANDB_API_KEY` or a netrc entry for the
W&B host) and otherwise writes an offline run that `wandb sync <dir>` uploads later; `disabled` never calls
wandb at all. No Ray import here: the trainer calls this with its own rank.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULTS: dict[str, Any] = {"project": "spo-ray", "entity": None, "mode": "auto", "tags": []}
MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"


class Tracker:
    """The no-op tracker: what non-zero ranks, `mode: disabled` and failed W&B runs use."""

    enabled = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record metrics at a training step (no-op)."""

    def finish(self, status: str = "TERMINATED") -> None:
        """Close the run, recording the trial's final status (no-op)."""

    def run_folder(self) -> Path | None:
        """The run's local folder (`<dir>/wandb/<offline-run-…>`), or None when nothing was written."""
        return None


class WandbRun(Tracker):
    """A live W&B run that switches itself off at its first failure."""

    enabled = True

    def __init__(self, run: Any):
        self.run = run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            self.run.log(dict(metrics), step=int(step))
        except Exception as error:  # any wandb failure must not reach the trainer
            self._disable("log", error)

    def finish(self, status: str = "TERMINATED") -> None:
        """Record `trial_status` in the summary; a non-TERMINATED status marks the W&B run failed."""
        if not self.enabled:
            return
        try:
            self.run.summary["trial_status"] = status
            self.run.finish(exit_code=0 if status == "TERMINATED" else 1)
            _flush()
        except Exception as error:
            self._disable("finish", error)
        self.enabled = False

    def run_folder(self) -> Path | None:
        run_dir = getattr(self.run, "dir", None)  # <dir>/wandb/<run>/files
        return Path(run_dir).parent if run_dir else None

    def _disable(self, action: str, error: BaseException) -> None:
        self.enabled = False
        warn(f"wandb {action} failed, tracking is off for this trial: {type(error).__name__}: {error}")


def _flush() -> None:
    """Wait until the run's files are on disk.

    In wandb 0.31 `run.finish()` returns before the background service has written the offline
    transaction log (`run-*.wandb`); a Ray worker killed right after its trial would lose the run's tail.
    `wandb.teardown()` waits for the service; the next run in the same process starts a new one (~0.4 s).
    """
    import wandb

    wandb.teardown()


def warn(message: str) -> None:
    """One line on stderr, with any API key redacted (wandb error messages may echo settings)."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        message = message.replace(key, "***")
    print("wandb: warning: " + " ".join(message.split()), file=sys.stderr)


def has_credentials() -> bool:
    """True when an API key is configured: the environment or a netrc entry for the W&B host.

    Checked locally (no network): this only decides between online and offline for mode `auto`.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# WANDB_MODE's own spellings of the modes, besides ours.
ENV_MODES = {"dryrun": "offline", "run": "online"}


def resolve_mode(mode: str | None) -> str:
    """Turn the configured mode into the one wandb gets: `auto` becomes online or offline. `WANDB_MODE`,
    where set, overrides the config, as it does for any W&B script (`WANDB_MODE=disabled` in CI, say):
    wandb itself lets an explicit `wandb.init(mode=...)` win over it."""
    source = "wandb.mode"
    if os.environ.get("WANDB_MODE"):
        source, mode = "WANDB_MODE", ENV_MODES.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


def start_run(
    wandb_cfg: Mapping[str, Any] | None,
    *,
    run_name: str,
    group: str,
    config: Mapping[str, Any],
    tags: Sequence[str] = (),
    dir: str | Path | None = None,
    rank: int = 0,
    job_type: str | None = None,
) -> Tracker:
    """Start the W&B run of one trial, or return a no-op tracker (rank ≠ 0, disabled, or wandb failed).

    `group` is the sweep name, so the W&B UI groups a sweep's trials; the loss is added to the tags so runs
    filter by method. `dir` is where wandb writes its `wandb/` folder (the trial's directory). `job_type`
    tells runs of another kind apart in the group (the report's run is `report`).
    """
    settings = {**DEFAULTS, **(wandb_cfg or {})}
    mode = resolve_mode(settings["mode"])
    if rank != 0 or mode == "disabled":
        return Tracker()
    all_tags = _tags(settings["tags"], tags, config.get("loss"))
    try:
        run = _init(settings, mode, run_name, group, config, all_tags, dir, job_type)
    except Exception as error:
        warn(f"wandb init failed, tracking is off for this trial: {type(error).__name__}: {error}")
        return Tracker()
    if mode == "offline":
        sync_dir = run.settings.sync_dir
        print(f"wandb: offline run saved in {sync_dir}; sync it later with: wandb sync {sync_dir}")
    return WandbRun(run)


def _tags(configured: Sequence[str] | None, extra: Sequence[str], loss: Any) -> list[str]:
    """Configured tags, then the caller's, then the loss name; duplicates dropped, order kept."""
    names = [*(configured or []), *extra, *([str(loss)] if loss else [])]
    return list(dict.fromkeys(str(n) for n in names))


def _init(settings: Mapping[str, Any], mode: str, run_name: str, group: str, config, tags, dir,
          job_type: str | None = None) -> Any:
    """Call wandb.init quietly; imported here so that `disabled` never loads wandb."""
    import wandb

    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=settings["project"],
        entity=settings["entity"],
        mode=mode,
        name=run_name,
        group=group,
        job_type=job_type,
        tags=tags,
        config=dict(config),
        dir=str(dir) if dir is not None else None,
        # silent: our one offline hint replaces wandb's banner; create_new: trials that share a process
        # (Tune actor reuse) each get their own run instead of silently reusing the last one.
        settings=wandb.Settings(silent=True, reinit="create_new"),
    )
