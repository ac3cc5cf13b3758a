"""The one place spo-ray reaches into Ray's private API, each access behind a guard.

Two features need what Ray does not expose: resuming a trial whose latest checkpoint the store lost
(`spo_ray.sweep.recover_lost_checkpoint` rewrites Train's checkpoint manager's list and drops the trial's
cached run metadata) and PBT that keeps its state across a resume and hands checkpoints over cleanly
(`spo_ray.search.SweepPBT`: Tune's PopulationBasedTraining's per-trial state, perturbation counters and
`_exploit`). They were written for and tested on Ray 2.60 (`WRITTEN_FOR`). A Ray release that moves one of
them makes these helpers fail with one line naming the package, its installed version and the range they
were written for — and `check()` does so before a sweep starts anything (exit 2), rather than an
AttributeError three frames inside Tune halfway through a sweep.
"""

from __future__ import annotations

from spo_ray.config import ConfigError

WRITTEN_FOR = "ray 2.50 to 2.60"


class UnsupportedRay(ConfigError):
    """The installed Ray lacks a private attribute spo-ray uses (bad input: the environment, exit 2)."""


def unsupported(what: str, missing: str) -> UnsupportedRay:
    import ray
    return UnsupportedRay(f"ray {ray.__version__}: {what} has no {missing}; spo-ray's use of it was written for "
                          f"{WRITTEN_FOR} (install the tested versions: make venv, constraints.txt)")


def require(obj, attributes: tuple[str, ...], what: str) -> None:
    for name in attributes:
        if not hasattr(obj, name):
            raise unsupported(what, name)


# The private names, in one place: the checks and the helpers both read these.
CHECKPOINT_MANAGER_FIELDS = ("_checkpoint_results", "_latest_checkpoint_result", "best_checkpoint_results")
RUN_METADATA_METHODS = ("invalidate_cache",)
PBT_FIELDS = ("_trial_state", "_next_perturbation_sync", "_num_perturbations", "_time_attr", "_exploit")


def training_result(checkpoint, metrics: dict):
    """Ray Train's record of a reported checkpoint (`_TrainingResult`), as its checkpoint manager keeps them."""
    try:
        from ray.train._internal.session import _TrainingResult
    except ImportError:
        raise unsupported("ray.train._internal.session", "_TrainingResult") from None
    return _TrainingResult(checkpoint=checkpoint, metrics=metrics)


def set_checkpoint_results(manager, results: list) -> None:
    """Make `results` (oldest first) the checkpoints Train's manager tracks, the last one its latest: the
    manager has no public setter."""
    require(manager, CHECKPOINT_MANAGER_FIELDS, "Train's checkpoint manager")
    manager._checkpoint_results = results
    manager._latest_checkpoint_result = results[-1] if results else None


def invalidate_run_metadata(trial) -> None:
    """Drop the trial's cached run-metadata JSON, so a checkpoint changed inside its manager is what Tune
    saves (it only notices attributes set on the metadata itself)."""
    require(trial.run_metadata, RUN_METADATA_METHODS, "Tune's trial run metadata")
    trial.run_metadata.invalidate_cache()


def check_pbt(scheduler) -> None:
    require(scheduler, PBT_FIELDS, "Tune's PopulationBasedTraining")


def check() -> None:
    """Every private attribute above on real Ray objects, before a sweep starts anything."""
    try:
        from ray.train import CheckpointConfig
        from ray.train._internal.checkpoint_manager import _CheckpointManager
        from ray.tune.experiment.trial import _TrainingRunMetadata
        from ray.tune.schedulers import PopulationBasedTraining
    except ImportError as error:
        raise unsupported("its module layout", f"{error.name or error}") from None
    training_result(None, {})
    require(_CheckpointManager(checkpoint_config=CheckpointConfig()), CHECKPOINT_MANAGER_FIELDS,
            "Train's checkpoint manager")
    require(_TrainingRunMetadata, RUN_METADATA_METHODS, "Tune's trial run metadata")
    check_pbt(PopulationBasedTraining(time_attr="step", metric="m", mode="max", hyperparam_mutations={"x": [0, 1]}))
