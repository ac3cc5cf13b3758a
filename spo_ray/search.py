"""Search beyond the grid: Optuna's model-based search scored over seeds, and Population Based Training.

Imported only by `spo_ray.sweep` (inside `build_tuner`, so that a dry run never imports Ray). What the YAML
may ask for, and every check of it, is in `spo_ray.config` (`TuneConfig`, `check_tune`); this module turns a
validated sweep into Tune's objects:

- `tune.search: optuna` → `searcher()`: Optuna's TPE (or its seeded random sampler) behind a `SeedRepeater`,
  which runs each suggestion once for every `train.seed` of the seed grid and tells Optuna the mean of the
  metric over those seeds, so one lucky seed cannot pass for a good λ.
- `tune.scheduler: pbt` → `pbt_scheduler()`: Ray's synchronous PBT over the YAML's mutations. Its exploit
  is Tune's: the weaker trial is restarted from the stronger trial's last checkpoint (the trainer's whole
  state: weights, AdamW, schedule, step, hence the data position) with the mutated config, which the
  trainer applies from the next step (`trainer.apply_optimizer_settings`; λ and β are read every step).
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager

import yaml

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.search import Repeater

from spo_ray import ray_internals, storage
from spo_ray.config import SEED_KEY, SweepConfig, get_dotted, seed_values, set_dotted, to_plain

# Not .json: Tune copies the experiment's .json and .pkl files into its staging folder on a resume and uploads
# them back later, which would overwrite the state written since with the one the sweep was resumed from.
PBT_STATE_FILE = "pbt_state.yaml"


# ---------------------------------------------------------------------------------------------------
# Optuna, scored over seeds

class SeedRepeater(Repeater):
    """Tune's `Repeater` with the repeats as `train.seed` values.

    Each suggestion of the inner searcher becomes one trial per seed, and the searcher learns the mean of
    the metric over them once all have finished (Repeater's scoring: NaN for a trial without the metric,
    ignored by the mean). Tune's Repeater would set an index (`__trial_index__`) that the trainable must turn
    into a seed; here the seed goes into the trial's config, so results.csv shows it like any grid's. Tune's
    search state keeps the groups across `--resume` (`SearchGenerator.save_to_dir` saves wrappers' state).
    """

    def __init__(self, searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=False)
        self.seeds = list(seeds)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) or Searcher.FINISHED
            return config
        index = list(self._trial_id_to_group[trial_id]._trials).index(trial_id)
        config = copy.deepcopy(config)
        set_dotted(config, SEED_KEY, self.seeds[index])
        return config


def searcher(raw: dict, sweep: SweepConfig, spaces: dict[str, dict]) -> SeedRepeater:
    """Optuna over the sweep's random spaces, seeded (`tune.seed`), `tune.points_to_evaluate` first. The
    concurrency limit is Tune's (`max_concurrent_trials` wraps it in a ConcurrencyLimiter)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    cfg = sweep.tune
    if cfg.sampler == "tpe":
        # constant_liar: trials still running count as bad, so parallel suggestions spread out.
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials,
                                             constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points = [{key.replace(".", "/"): value for key, value in point.items()} for point in cfg.points_to_evaluate]
    return SeedRepeater(OptunaSearch(sampler=sampler, points_to_evaluate=points or None), seed_values(raw, sweep))


def searcher_space(space: dict, raw: dict, sweep: SweepConfig) -> dict:
    """The param space a searcher takes: the seed grid removed (SeedRepeater sets each trial's seed)."""
    space = copy.deepcopy(space)
    set_dotted(space, SEED_KEY, seed_values(raw, sweep)[0])
    return space


def total_trials(raw: dict, sweep: SweepConfig) -> int:
    """Tune's num_samples under a searcher: every suggestion (tune.num_samples of them) × every seed."""
    return sweep.tune.num_samples * len(seed_values(raw, sweep))


# ---------------------------------------------------------------------------------------------------
# Population Based Training

class Draw:
    """A fresh value of a continuous mutation (PBT's "resample"), from Python's `random` (which
    `SweepPBT` seeds and saves)."""

    def __init__(self, kind: str, low: float, high: float):
        self.kind, self.low, self.high = kind, low, high

    def __call__(self) -> float:
        if self.kind == "loguniform":
            return math.exp(random.uniform(math.log(self.low), math.log(self.high)))
        return random.uniform(self.low, self.high)


class ClipToRanges:
    """PBT's custom explore step: a value perturbed by × 1.2 or × 0.8 stays inside its declared range."""

    def __init__(self, ranges: dict[str, tuple[float, float]]):
        self.ranges = ranges

    def __call__(self, config: dict) -> dict:
        for key, (low, high) in self.ranges.items():
            set_dotted(config, key, min(max(get_dotted(config, key), low), high))
        return config


def mutations(sweep: SweepConfig) -> tuple[dict, dict[str, tuple[float, float]]]:
    """Ray's nested `hyperparam_mutations` from the YAML's dotted ones, and the continuous ranges to clip to.
    A choice is an ordered list (PBT moves to a neighbour); uniform and loguniform are continuous."""
    nested, ranges = {}, {}
    for key, space in sweep.tune.mutations.items():
        kind, spec = next(iter(space.items()))
        if kind == "choice":
            set_dotted(nested, key, [float(v) for v in spec])
        else:
            set_dotted(nested, key, Draw(kind, float(spec[0]), float(spec[1])))
            ranges[key] = (float(spec[0]), float(spec[1]))
    return nested, ranges


def pbt_space(space: dict, sweep: SweepConfig, spaces: dict[str, dict]) -> dict:
    """The param space under PBT: every mutated key present (PBT perturbs only what a trial's config holds)
    and a float (PBT rounds a perturbed int back to an int: λ = 1 would stay 1 forever)."""
    space = copy.deepcopy(space)
    resolved = to_plain(sweep)
    for key in sweep.tune.mutations:
        if key in spaces:
            kind, spec = next(iter(spaces[key].items()))
            if kind in ("grid", "choice"):
                values = [float(v) for v in spec]
                set_dotted(space, key, tune.grid_search(values) if kind == "grid" else tune.choice(values))
        else:
            set_dotted(space, key, float(get_dotted(resolved, key)))
    return space


def pbt_checkpoints_to_keep(sweep: SweepConfig) -> int:
    """A copied checkpoint must outlive the donor's next ones until the receiver has loaded it: the donor
    may write interval / checkpoint_every more before the receiver's turn comes."""
    return max(sweep.tune.keep_checkpoints, sweep.tune.perturbation_interval // sweep.train.checkpoint_every + 1)


class SweepPBT(PopulationBasedTraining):
    """Ray's PBT (synchronous: trials are compared at the same step) with what a sweep needs of it:

    - no perturbation at a run's last step (exploiting a finished run would restart it with nothing to do);
    - its own random state, seeded by `tune.seed`, for the choice of donors and the mutations;
    - its state (each trial's last perturbation, the next synchronisation step, the random state) written to
      `pbt_state.yaml` in the experiment directory after every perturbation and read back when the sweep is
      resumed: Tune saves no scheduler state, and a fresh PBT would perturb every resumed trial at once.
    """

    def __init__(self, directory: str, max_steps: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        ray_internals.check_pbt(self)  # the private fields below (spo_ray.ray_internals)
        self.state_path = storage.join(directory, PBT_STATE_FILE)
        self.max_steps = max_steps
        self.random_state = random.Random(seed).getstate()
        self.saved_trials: dict[str, dict] | None = None  # read on the first trial added

    @contextmanager
    def own_random(self):
        outside = random.getstate()
        random.setstate(self.random_state)
        try:
            yield
        finally:
            self.random_state = random.getstate()
            random.setstate(outside)

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if self.saved_trials is None:
            self.load()
        saved = self.saved_trials.get(trial.trial_id)
        if saved:
            state = self._trial_state[trial]
            state.last_perturbation_time = saved["last_perturbation_time"]
            state.last_train_time = saved["last_train_time"]
            state.last_score = saved["last_score"]

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self.max_steps:
            return TrialScheduler.CONTINUE
        before = self._trial_state[trial].last_train_time, self._next_perturbation_sync
        with self.own_random():
            decision = super().on_trial_result(tune_controller, trial, result)
        if (self._trial_state[trial].last_train_time, self._next_perturbation_sync) != before:
            self.save()  # the trial reached a perturbation step
        return decision

    def _exploit(self, tune_controller, trial, trial_to_clone):
        super()._exploit(tune_controller, trial, trial_to_clone)
        # Ray's exploit points the receiver at the donor's checkpoint inside its checkpoint manager, which does
        # not clear the trial's cached run-metadata JSON (ray 2.60: only attributes set on the metadata itself
        # do). A sweep stopped before the receiver's next result would save the new config with the old
        # checkpoint, and resume the receiver from its own weights under the donor's hyperparameters.
        ray_internals.invalidate_run_metadata(trial)

    def save(self) -> None:
        from spo_ray.results import write_yaml
        version, internal, gauss = self.random_state
        write_yaml({"next_perturbation_sync": self._next_perturbation_sync,
                    "num_perturbations": self._num_perturbations,
                    "random_state": [version, list(internal), gauss],
                    "trials": {trial.trial_id: {"last_perturbation_time": s.last_perturbation_time,
                                                "last_train_time": s.last_train_time, "last_score": s.last_score}
                               for trial, s in self._trial_state.items()}}, self.state_path)

    def load(self) -> None:
        self.saved_trials = {}
        if not storage.exists(self.state_path):
            return
        state = yaml.safe_load(storage.read_bytes(self.state_path))
        self._next_perturbation_sync = state["next_perturbation_sync"]
        self._num_perturbations = state["num_perturbations"]
        version, internal, gauss = state["random_state"]
        self.random_state = (version, tuple(internal), gauss)
        self.saved_trials = state["trials"]


def pbt_scheduler(sweep: SweepConfig, directory: str) -> SweepPBT:
    cfg = sweep.tune
    nested, ranges = mutations(sweep)
    return SweepPBT(directory, sweep.train.max_steps, cfg.seed, time_attr="step",
                    perturbation_interval=cfg.perturbation_interval, hyperparam_mutations=nested,
                    quantile_fraction=cfg.quantile_fraction, resample_probability=cfg.resample_probability,
                    custom_explore_fn=ClipToRanges(ranges), require_attrs=False, synch=True)


__all__ = ["SeedRepeater", "searcher", "searcher_space", "total_trials", "SweepPBT", "pbt_scheduler", "pbt_space",
           "pbt_checkpoints_to_keep"]
