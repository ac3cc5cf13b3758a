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
                           "checkpoint_every": 1, **train_keys})


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
    """A run of 8 steps with λ = 1 and a checkpoint after every step: the trial PBT copies."""
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
    donor's next step (same weights, same batch), so the base loss and the penalty P are the donor's and the
    loss differs by exactly (2.5 − 1)·P; the learning rate is the new base times the schedule's factor. The
    receiver starts before the donor's first step with the penalty on (which steps have it moves with the
    rounding of the init: 3 and 5 in one run, 2 in another), since only there does λ reach the loss."""
    rows, states, reference_dir = donor
    active = [step for step in range(2, 9) if rows[step]["train/spo_penalty"] > 0]
    assert active, "no step of the donor has the SPO penalty on"
    first = active[0]
    donor_lr = spo_run()["train"]["learning_rate"]
    mutated = {**spo_run(learning_rate=2 * donor_lr), "loss": {"name": "spo", "spo_lambda": 2.5}}
    received, _ = run(mutated, init_cache, reference_dir, resume=states[first - 1])
    assert sorted(received) == list(range(first, 9))
    assert [rows[s]["train/spo_lambda"] for s in (first - 1, first)] == [1.0, 1.0]
    assert [received[s]["train/spo_lambda"] for s in range(first, 9)] == [2.5] * (9 - first)
    penalty = rows[first]["train/spo_penalty"]
    # float32 losses of size ~1: the two runs add the same terms, so they agree to a few ulps
    assert received[first]["train/loss"] - rows[first]["train/loss"] == pytest.approx(1.5 * penalty, rel=1e-5,
                                                                                      abs=1e-6)
    assert received[first]["train/chosen_logp_delta"] == pytest.approx(rows[first]["train/chosen_logp_delta"],
                                                                       abs=1e-6)
    factor = lr_lambda("cosine", 0, 8)  # the tiny run: cosine over 8 steps, no warm-up
    assert received[first]["train/learning_rate"] == pytest.approx(2 * donor_lr * factor(first - 1), rel=1e-12)
    assert rows[first]["train/learning_rate"] == pytest.approx(donor_lr * factor(first - 1), rel=1e-12)
    if first < 8:
        assert received[first + 1]["train/learning_rate"] == pytest.approx(2 * donor_lr * factor(first), rel=1e-12)


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


# ---------------------------------------------------------------------------------------------------
# Optuna behind SeedRepeater (Tune's searcher interface, called directly: no Ray cluster)

def optuna_sweep(seed=0, startup_trials=2, points=()):
    from spo_ray.config import validate_sweep
    raw = tiny_run(loss={"name": "spo", "spo_lambda": {"loguniform": [0.01, 10]}},
                   train={"seed": {"grid": [0, 1]}, "learning_rate": {"loguniform": [1e-4, 3e-3]}})
    raw["tune"] = {"search": "optuna", "seed": seed, "startup_trials": startup_trials, "num_samples": 4,
                   "metric": "eval/mass_correct", "points_to_evaluate": list(points)}
    sweep, spaces = validate_sweep(raw)
    return raw, sweep, spaces


def test_optuna_takes_ray_train_trials_where_pbt_refuses_them(tmp_path):
    """A searcher needs only each trial's final metric, which Ray Train trials report like in-process ones;
    PBT needs Tune to hold each trial's checkpoint, which Train V2's Tune callback does not hand over."""
    from spo_ray.config import ConfigError, validate_sweep
    raw, _, _ = optuna_sweep()
    raw["scaling"] = {"num_workers": 2}
    sweep, _ = validate_sweep(raw)
    assert sweep.scaling.ray_train and sweep.tune.search == "optuna"
    raw, _, _ = pbt_sweep(tmp_path)
    raw["scaling"] = {"num_workers": 2}
    with pytest.raises(ConfigError, match="tune.scheduler: pbt cannot run Ray Train trials"):
        validate_sweep(raw)


def ready_searcher(raw, sweep, spaces):
    """The searcher as Tune sets it up: metric, mode and the param space (seed grid removed)."""
    from spo_ray import search
    from spo_ray.sweep import param_space
    searcher = search.searcher(raw, sweep, spaces)
    searcher.set_search_properties("eval/mass_correct", "max", search.searcher_space(param_space(raw, spaces),
                                                                                    raw, sweep))
    return searcher


def suggestions(seed, scores=(0.2, 0.6, 0.9, 0.1, 0.5, 0.7, 0.3, 0.4)):
    """(λ, learning rate, seed) of 8 trials (4 suggestions × 2 seeds), each finished with the next score."""
    searcher = ready_searcher(*optuna_sweep(seed))
    out = []
    for i, score in enumerate(scores):
        config = searcher.suggest(f"t{i}")
        out.append((config["loss"]["spo_lambda"], config["train"]["learning_rate"], config["train"]["seed"]))
        searcher.on_trial_complete(f"t{i}", {"eval/mass_correct": score})
    return out


def test_the_same_seed_gives_the_same_optuna_suggestions():
    """Through the random start-up (2 suggestions) and TPE's model (the next 2, fitted to the scores)."""
    first, again, other = suggestions(seed=0), suggestions(seed=0), suggestions(seed=1)
    assert first == again
    assert [s[:2] for s in first] != [s[:2] for s in other]
    assert all(0.01 <= lam <= 10 and 1e-4 <= lr <= 3e-3 for lam, lr, _ in first)


def test_each_suggestion_runs_for_every_seed_and_optuna_learns_the_mean_over_seeds():
    searcher = ready_searcher(*optuna_sweep())
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["train"]["seed"] for c in configs] == [0, 1, 0, 1]
    assert configs[0]["loss"] == configs[1]["loss"] and configs[2]["loss"] == configs[3]["loss"]
    assert configs[0]["loss"] != configs[2]["loss"]
    study = searcher.searcher._ot_study
    searcher.on_trial_complete("t0", {"eval/mass_correct": 0.2})
    assert study.trials[0].value is None  # the other seed has not finished: Optuna is told nothing yet
    searcher.on_trial_complete("t1", {"eval/mass_correct": 0.7})
    assert study.trials[0].value == pytest.approx((0.2 + 0.7) / 2, rel=1e-12)


def test_optuna_runs_points_to_evaluate_first_for_every_seed():
    searcher = ready_searcher(*optuna_sweep(points=[{"loss.spo_lambda": 2.0, "train.learning_rate": 5e-4}]))
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    assert (first["loss"]["spo_lambda"], first["train"]["learning_rate"]) == (2.0, 5e-4)
    assert (second["loss"]["spo_lambda"], second["train"]["seed"]) == (2.0, 1)


def test_a_restored_searcher_scores_a_suggestion_whose_seeds_finished_across_the_interruption(tmp_path):
    """What --resume does to the searcher (Tune's SearchGenerator saves the wrappers' state and Optuna's
    study): a suggestion with one seed finished before the interruption and one after is scored by the mean."""
    from ray.tune.search import SearchGenerator
    raw, sweep, spaces = optuna_sweep()
    before = SearchGenerator(ready_searcher(raw, sweep, spaces))
    lam = before.searcher.suggest("t0")["loss"]["spo_lambda"]
    before.searcher.suggest("t1")
    before.on_trial_complete("t0", {"eval/mass_correct": 0.3})
    before.save_to_dir(str(tmp_path), session_str="interrupted")

    after = SearchGenerator(ready_searcher(raw, sweep, spaces))
    after.restore_from_dir(str(tmp_path))
    after.on_trial_complete("t1", {"eval/mass_correct": 0.5})
    trial = after.searcher.searcher._ot_study.trials[0]
    assert trial.params["loss/spo_lambda"] == lam and trial.value == pytest.approx(0.4, rel=1e-12)
    assert after.searcher.suggest("t2")["loss"]["spo_lambda"] != lam  # a new suggestion, seed 0 again
    assert after.searcher.suggest("t3")["train"]["seed"] == 1


# ---------------------------------------------------------------------------------------------------
# PBT's pieces

def pbt_sweep(tmp_path, **tune):
    from spo_ray.config import validate_sweep
    raw = tiny_run(loss={"name": "spo", "spo_lambda": {"grid": [1, 2]}},
                   train={"max_steps": 12, "checkpoint_every": 4, "eval_every": 4})
    raw["storage_path"] = str(tmp_path)
    raw["tune"] = {"scheduler": "pbt", "perturbation_interval": 4, "metric": "eval/loss", "mode": "min",
                   "mutations": {"loss.spo_lambda": {"loguniform": [0.1, 10]},
                                 "train.learning_rate": {"choice": [1e-4, 1e-3]}}, **tune}
    sweep, spaces = validate_sweep(raw)
    return raw, sweep, spaces


def test_pbt_mutates_floats_within_their_declared_ranges(tmp_path):
    from spo_ray import search
    from spo_ray.sweep import param_space
    raw, sweep, spaces = pbt_sweep(tmp_path)
    space = search.pbt_space(param_space(raw, spaces), sweep, spaces)
    # λ's grid [1, 2] becomes floats (PBT rounds a perturbed int), and the learning rate, not in the YAML's
    # spaces, is present for PBT to perturb
    assert space["loss"]["spo_lambda"] == {"grid_search": [1.0, 2.0]}
    assert all(type(v) is float for v in space["loss"]["spo_lambda"]["grid_search"])
    assert space["train"]["learning_rate"] == 1e-3
    nested, ranges = search.mutations(sweep)
    assert nested["train"]["learning_rate"] == [1e-4, 1e-3] and ranges == {"loss.spo_lambda": (0.1, 10.0)}
    clip = search.ClipToRanges(ranges)
    assert clip({"loss": {"spo_lambda": 12.0}})["loss"]["spo_lambda"] == 10.0
    assert clip({"loss": {"spo_lambda": 0.05}})["loss"]["spo_lambda"] == 0.1
    draw = nested["loss"]["spo_lambda"]
    values = [draw() for _ in range(2000)]
    assert 0.1 <= min(values) and max(values) <= 10
    # log-uniform on [0.1, 10]: half the draws below the geometric midpoint 1 (binomial sd 0.011)
    assert sum(v < 1 for v in values) / len(values) == pytest.approx(0.5, abs=0.05)


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id, self.experiment_tag = trial_id, trial_id


def test_pbt_state_survives_a_resume(tmp_path):
    """Tune saves no scheduler state: SweepPBT writes each trial's last perturbation, the next synchronisation
    step and its random state, and a scheduler made afresh (as on --resume) continues from them."""
    import random

    from ray.tune.schedulers.pbt import _PBTTrialState
    from spo_ray import search
    raw, sweep, spaces = pbt_sweep(tmp_path)
    before = search.pbt_scheduler(sweep, str(tmp_path))
    for trial_id, score in (("a", -0.5), ("b", -0.7)):
        state = before._trial_state[FakeTrial(trial_id)] = _PBTTrialState(FakeTrial(trial_id))
        state.last_perturbation_time, state.last_train_time, state.last_score = 8, 8, score
    before._next_perturbation_sync, before._num_perturbations = 12, 3
    with before.own_random():
        random.random()  # the scheduler has drawn before
    before.save()

    after = search.pbt_scheduler(sweep, str(tmp_path))
    after.load()
    assert (after._next_perturbation_sync, after._num_perturbations) == (12, 3)
    assert after.saved_trials == {"a": {"last_perturbation_time": 8, "last_train_time": 8, "last_score": -0.5},
                                  "b": {"last_perturbation_time": 8, "last_train_time": 8, "last_score": -0.7}}
    with before.own_random():
        expected = [random.random() for _ in range(3)]
    outside = random.getstate()
    with after.own_random():
        assert [random.random() for _ in range(3)] == expected
    assert random.getstate() == outside  # the scheduler's draws leave everyone else's random alone


class ExploitedTrial(FakeTrial):
    """What Ray's PBT exploit (ray 2.60's PopulationBasedTraining._exploit) reads and writes of a Tune trial: its
    config, tag, status and run metadata (Tune's own class, holding Ray's checkpoint manager)."""

    def __init__(self, trial_id, config, checkpoint, folder):
        from ray.train import CheckpointConfig
        from ray.train._internal.checkpoint_manager import _CheckpointManager
        from ray.train._internal.session import _TrainingResult
        from ray.tune.trainable.metadata import _TrainingRunMetadata
        super().__init__(trial_id)
        self.config, self.status = config, "PAUSED"  # synchronous PBT exploits paused trials
        self.local_experiment_path = self.local_dir = folder  # where PBT logs its policy
        self.last_result = {"training_iteration": 4}
        self.run_metadata = _TrainingRunMetadata()
        self.run_metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
        self.run_metadata.checkpoint_manager.register_checkpoint(_TrainingResult(checkpoint, metrics={"step": 4}))

    def set_experiment_tag(self, tag):
        self.experiment_tag = tag

    def set_config(self, config):
        self.config = config

    def is_finished(self):
        return False


def test_an_exploit_reaches_the_state_tune_saves_before_the_receivers_next_result(tmp_path):
    """Tune saves a trial's run metadata from a cached JSON; Ray's exploit changes the receiver's latest checkpoint
    without clearing it. A sweep stopped right after an exploit must still resume the receiver from the donor's
    checkpoint (it resumed from its own, under the donor's mutated values: seen as a missing exploit row)."""
    import pyarrow.fs
    from ray.train import Checkpoint
    from ray.tune.schedulers.pbt import _PBTTrialState
    from ray.tune.trainable.metadata import _TrainingRunMetadata
    from spo_ray import search
    raw, sweep, spaces = pbt_sweep(tmp_path)
    scheduler = search.pbt_scheduler(sweep, str(tmp_path))
    fs, config = pyarrow.fs.LocalFileSystem(), {"loss": {"spo_lambda": 1.0}, "train": {"learning_rate": 1e-3}}
    trials = {}
    for trial_id, score in (("receiver", -0.9), ("donor", -0.1)):
        folder = tmp_path / trial_id / "checkpoint_000000"
        folder.mkdir(parents=True)
        trial = trials[trial_id] = ExploitedTrial(trial_id, dict(config), Checkpoint(str(folder), fs), str(tmp_path))
        state = scheduler._trial_state[trial] = _PBTTrialState(trial)
        state.last_checkpoint, state.last_result, state.last_score = Checkpoint(str(folder), fs), {"step": 4}, score
        trial.run_metadata.get_json_state()  # Tune's periodic save: the JSON is cached
    scheduler._exploit(None, trials["receiver"], trials["donor"])
    saved = _TrainingRunMetadata.from_json_state(trials["receiver"].run_metadata.get_json_state())
    assert saved.checkpoint_manager.latest_checkpoint_result.checkpoint.path == str(tmp_path / "donor" / "checkpoint_000000")


def test_pbt_leaves_a_runs_last_step_alone(tmp_path):
    from ray.tune.schedulers import TrialScheduler
    from spo_ray import search
    raw, sweep, spaces = pbt_sweep(tmp_path)
    scheduler = search.pbt_scheduler(sweep, str(tmp_path))
    # the trial is unknown to the scheduler: anything but an early return would fail on it
    assert scheduler.on_trial_result(None, FakeTrial("a"), {"step": 12, "eval/loss": 0.5}) == TrialScheduler.CONTINUE


# ---------------------------------------------------------------------------------------------------
# Analysis: best so far, lineage, schedule, the report's sections

def test_best_so_far_scores_each_configuration_by_its_mean_over_seeds_in_suggestion_order():
    from analysis.search import configurations
    results = pd.DataFrame({
        "trial_id": list("abcdef"), "status": "TERMINATED", "error": "",
        "loss": "spo", "spo_lambda": [1.0, 1.0, 0.1, 0.1, 5.0, 5.0], "seed": [0, 1, 0, 1, 0, 1],
        "eval/mass_correct": [0.6, 0.8, 0.9, 0.3, 0.75, 0.85], "step": [100, 100, 100, 100, 50, 100]})
    table = configurations(results, "eval/mass_correct")
    assert list(table["spo_lambda"]) == [1.0, 0.1, 5.0]
    assert list(table["score"]) == pytest.approx([0.7, 0.6, 0.8])  # (0.6+0.8)/2, (0.9+0.3)/2, (0.75+0.85)/2
    assert list(table["best_so_far"]) == pytest.approx([0.7, 0.7, 0.8])
    assert list(table["trials_so_far"]) == [2, 4, 6] and list(table["steps_so_far"]) == [200, 400, 550]


def pbt_history() -> pd.DataFrame:
    """Three trials over 30 steps, a row every 5: b took a's checkpoint at step 10 (λ 1 → 2), c took b's at
    20 (λ 2 → 4, learning rate 1e-3 → 2e-3); a and c kept theirs otherwise."""
    rows = []
    values = {"a": lambda s: (1.0, 1e-3), "b": lambda s: (3.0, 5e-4) if s <= 10 else (2.0, 1e-3),
              "c": lambda s: (0.5, 1e-4) if s <= 20 else (4.0, 2e-3)}
    exploits = {("b", 15): ("a", 10), ("c", 25): ("b", 20)}
    for trial, value in values.items():
        for step in range(5, 31, 5):
            lam, lr = value(step)
            donor, at = exploits.get((trial, step), (None, None))
            rows.append({"trial_id": trial, "step": step, "hp/spo_lambda": lam, "hp/learning_rate": lr,
                         "exploit/donor": donor, "exploit/step": at,
                         "eval/mass_correct": {"a": 0.6, "b": 0.7, "c": 0.9}[trial] if step % 10 == 0 else None})
    return pd.DataFrame(rows)


def test_the_lineage_follows_exploits_back_to_the_start():
    from analysis.search import lineage, schedule, schedule_yaml
    history = pbt_history()
    assert lineage(history, "c") == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]
    assert lineage(history, "b") == [("a", 0, 10), ("b", 10, 30)]
    assert lineage(history, "a") == [("a", 0, 30)]
    table = schedule(history, "c")
    assert table.to_dict("records") == [
        {"from_step": 0, "to_step": 10, "trial_id": "a", "spo_lambda": 1.0, "learning_rate": 1e-3},
        {"from_step": 10, "to_step": 20, "trial_id": "b", "spo_lambda": 2.0, "learning_rate": 1e-3},
        {"from_step": 20, "to_step": 30, "trial_id": "c", "spo_lambda": 4.0, "learning_rate": 2e-3}]
    assert schedule_yaml(table, ["loss.spo_lambda", "train.learning_rate", "loss.beta"]) == {
        "loss.spo_lambda": [[0, 1.0], [10, 2.0], [20, 4.0]], "train.learning_rate": [[0, 1e-3], [10, 1e-3], [20, 2e-3]]}


def test_the_population_best_counts_the_steps_every_trial_spent():
    from analysis.search import population_best
    table = population_best(pbt_history(), "eval/mass_correct")
    assert list(table["step"]) == [10, 20, 30] and list(table["best"]) == [0.9, 0.9, 0.9]
    assert list(table["steps_so_far"]) == [30, 60, 90]  # three trials × the step


def test_the_report_of_a_pbt_sweep_has_its_lineage_and_the_best_trials_schedule(tmp_path):
    import yaml

    from analysis.report import write_report
    history = pbt_history()
    results = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": "TERMINATED", "error": "", "loss": "spo",
                            "spo_lambda": [1.0, 3.0, 0.5], "seed": 0, "eval/mass_correct": [0.6, 0.7, 0.9],
                            "step": 30})
    results.to_csv(tmp_path / "results.csv", index=False)
    history.to_parquet(tmp_path / "history.parquet")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"tune": {"scheduler": "pbt", "mutations": {
        "loss.spo_lambda": {"loguniform": [0.1, 10]}, "train.learning_rate": {"choice": [1e-3, 2e-3]}}}}))
    report = write_report(tmp_path, metric="eval/mass_correct").read_text()
    assert "## PBT: the best trial's schedule" in report
    assert "| 20 | 30 | c | 4 | 0.002 |" in report
    assert "loss.spo_lambda: [[0, 1.0], [10, 2.0], [20, 4.0]]" in report  # the schedule: section to re-run it
    plot = tmp_path / "plots" / "pbt_lineage.png"
    assert "(plots/pbt_lineage.png)" in report and plot.read_bytes()[:4] == b"\x89PNG"
    assert "best so far" not in report.lower()  # not a searcher's sweep


def test_pbt_keeps_every_checkpoint_a_receiver_may_still_load(tmp_path):
    """Synchronous PBT: at a perturbation step every trial is paused and a receiver is pointed at its donor's
    checkpoint of that step. On a busy cluster the donor may be resumed first and train on to the next
    perturbation step, where it pauses until every trial, the receiver included, has reached it: so it writes
    at most interval ÷ checkpoint_every checkpoints before the receiver loads, and Tune must keep that many more
    than the one being loaded (Ray's default of 1 would delete it after the donor's next checkpoint)."""
    from spo_ray.search import pbt_checkpoints_to_keep
    assert pbt_checkpoints_to_keep(pbt_sweep(tmp_path)[1]) == 2  # interval 4, a checkpoint every 4 steps
    assert pbt_checkpoints_to_keep(pbt_sweep(tmp_path, perturbation_interval=8)[1]) == 3  # 2 more, and the one loaded
    assert pbt_checkpoints_to_keep(pbt_sweep(tmp_path, keep_checkpoints=6)[1]) == 6  # a larger wish stands
