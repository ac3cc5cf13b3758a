"""The sweep CLI: dry runs and bad input without Ray (fast); end-to-end Ray Tune / Ray Train runs (slow).

The slow tests each start a local Ray cluster (~15 s here) and train tiny models, so there are few of them:
one sweep through Tune in-process trials, one 2-worker DDP trial through Ray Train checked against the
in-process trainer, one interrupted-then-resumed sweep, and one sweep of sampled pairs (the driver samples on
Ray workers before the trials).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
import yaml

from conftest import tiny_run

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_COLUMNS = ["trial_id", "status", "error", "loss", "beta", "spo_lambda", "init", "seed",
                    "eval/accuracy", "eval/chosen_logp_delta", "train/loss", "step", "wall_time_s"]


def run_cli(*args, cwd=ROOT, timeout=480, env=None):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "spo_ray.sweep", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_sweep(tmp_path, name="tiny", **sections) -> Path:
    """A sweep YAML of tiny, from-scratch trials (seconds each) storing under tmp_path."""
    raw = tiny_run(**sections)
    raw.update(name=name, storage_path=str(tmp_path / "results"), wandb={"mode": "disabled"},
               tune={"max_concurrent_trials": 2}, scaling={"num_workers": 1, "cpus_per_worker": 1})
    for key in ("scaling", "tune"):
        raw[key].update(sections.get(key, {}))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------------
# Fast: no Ray

def test_dry_run_lists_every_trial_of_the_demo_grid_without_ray(tmp_path):
    result = run_cli("sweeps/beta.yaml", "--dry-run", "--storage-path", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header, rows, summary = lines[0].split(), [line.split() for line in lines[1:-1]], lines[-1]
    assert header == ["trial", "loss.name", "loss.beta", "train.seed"]
    assert len(rows) == 12 and summary.startswith("12 trials")
    assert rows[0] == ["1", "dpo", "0.05", "0"] and rows[1] == ["2", "dpo", "0.05", "1"]
    assert rows[-1] == ["12", "spo", "0.3", "1"]
    assert {(r[1], r[2], r[3]) for r in rows} == {(l, b, s) for l in ("dpo", "spo")
                                                  for b in ("0.05", "0.1", "0.3") for s in ("0", "1")}
    assert not any(tmp_path.iterdir())  # nothing written, nothing started


def test_dry_run_does_not_import_ray():
    code = ("import sys; from spo_ray.sweep import main; rc = main(['sweeps/smoke.yaml', '--dry-run']); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 + 2 + 1  # header, dpo and spo, summary


def test_dry_run_repeats_the_grid_num_samples_times():
    # Repeated --set flags add up (as one --set with several values does).
    result = run_cli("sweeps/smoke.yaml", "--dry-run", "--set", "tune.num_samples=3",
                     "--set", "loss.beta={loguniform: [0.01, 1]}")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()[1:-1]
    assert len(rows) == 6 and all("loguniform(0.01, 1)" in row for row in rows)


@pytest.mark.parametrize("args, message", [
    (["sweeps/beta.yaml", "--set", "loss.bta=0.2"], "error: --set loss.bta: unknown key (did you mean 'loss.beta'?)"),
    (["sweeps/beta.yaml", "--set", "loss.beta={grid: [0.1, -1]}"], "error: loss.beta:"),
    (["sweeps/beta.yaml", "--set", "train.max_steps={grid: []}"], "error: train.max_steps: grid needs a non-empty"),
    (["sweeps/missing.yaml"], "error: sweeps/missing.yaml: no such file"),
])
def test_bad_input_is_one_stderr_line_and_exit_2(args, message):
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message)


def test_a_wandb_mode_wandb_does_not_know_is_one_stderr_line_and_exit_2():
    result = run_cli("sweeps/beta.yaml", "--dry-run", env={"WANDB_MODE": "sometimes"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "error: WANDB_MODE must be one of auto, online, offline, disabled, got 'sometimes'\n"


def test_resume_without_a_previous_sweep_is_bad_input(tmp_path):
    result = run_cli("sweeps/smoke.yaml", "--resume", "--storage-path", tmp_path)
    assert result.returncode == 2 and "holds no sweep to resume" in result.stderr
    assert "Traceback" not in result.stderr


class FakeTrial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_result_tables_keep_one_row_per_trial_and_replace_rerun_steps(tmp_path):
    from spo_ray.sweep import ResultTables
    tables = ResultTables(str(tmp_path), ["loss.name"])
    trial = FakeTrial("t1", {"loss": {"name": "spo", "beta": 0.3}})
    for step in (2, 4):
        tables.result(trial, {"step": step, "train/loss": 1.0 / step, "training_iteration": step, "config": {}})
    tables.result(trial, {"step": 4, "train/loss": 0.2, "eval/accuracy": 0.5})  # re-run from a checkpoint
    diverged = FakeTrial("t2", {"loss": {"name": "dpo"}})
    tables.result(diverged, {"step": 2, "train/loss": 0.7, "trial_status": "DIVERGED",
                             "error": "loss is not finite at step 3"})
    tables.complete(trial)
    tables.complete(diverged)

    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert list(results["trial_id"]) == ["t1", "t2"]
    assert list(results["status"]) == ["TERMINATED", "DIVERGED"]
    assert results.loc[1, "error"] == "loss is not finite at step 3"
    assert list(results.columns[:8]) == ["trial_id", "status", "error", "loss", "beta", "spo_lambda", "init", "seed"]
    assert results.loc[0, "beta"] == 0.3 and results.loc[0, "train/loss"] == 0.2
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert list(zip(history["trial_id"], history["step"])) == [("t1", 2), ("t1", 4), ("t2", 2)]
    assert "training_iteration" not in history and "config" not in history

    reloaded = ResultTables(str(tmp_path), ["loss.name"])
    reloaded.load()
    assert reloaded.statuses() == {"TERMINATED": 1, "DIVERGED": 1}
    assert [row["step"] for row in reloaded.history["t1"]] == [2, 4]


def test_per_question_lists_go_to_history_and_sampler_figures_to_both_tables(tmp_path):
    from spo_ray.sweep import ResultTables
    tables = ResultTables(str(tmp_path), ["loss.name"])
    trial = FakeTrial("t1", {"loss": {"name": "dpo"}})
    tables.result(trial, {"step": 0, "eval/accuracy": 0.5, "eval/answers_correct": [1, 0], "sampler/pairs": 12.0})
    tables.result(trial, {"step": 4, "eval/accuracy": 1.0, "eval/answers_correct": [1, 1], "sampler/pairs": 12.0})
    tables.complete(trial)
    results = pd.read_csv(tmp_path / "results.csv")
    assert "eval/answers_correct" not in results and results.loc[0, "sampler/pairs"] == 12.0
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert [list(v) for v in history["eval/answers_correct"]] == [[1, 0], [1, 1]]
    reloaded = ResultTables(str(tmp_path), ["loss.name"])
    reloaded.load()  # the lists survive a resumed sweep's rewrite of the table
    reloaded.result(trial, {"step": 8, "eval/accuracy": 1.0})
    assert [list(v) if v is not None else None for v in pd.read_parquet(tmp_path / "history.parquet")
            ["eval/answers_correct"]] == [[1, 0], [1, 1], None]


@pytest.mark.parametrize("statuses, expected, code, counts", [
    (["TERMINATED", "TERMINATED"], 2, 0, "2 trials: 2 TERMINATED"),
    (["TERMINATED"], 2, 130, "2 trials: 1 TERMINATED, 1 not started"),   # interrupted before Tune made it
    (["TERMINATED", "PAUSED"], 2, 130, "2 trials: 1 PAUSED, 1 TERMINATED"),
    (["TERMINATED", "ERROR"], 3, 130, "3 trials: 1 ERROR, 1 TERMINATED, 1 not started"),
    (["TERMINATED", "ERROR"], 2, 1, "2 trials: 1 ERROR, 1 TERMINATED"),
])
def test_the_exit_code_counts_grid_points_that_never_got_a_trial(tmp_path, capsys, statuses, expected, code,
                                                                 counts):
    from spo_ray.sweep import parse_args, summarize
    pd.DataFrame({"trial_id": [f"t{i}" for i in range(len(statuses))], "status": statuses,
                  "error": ["boom" if s == "ERROR" else "" for s in statuses]}).to_csv(tmp_path / "results.csv")
    assert summarize(tmp_path, parse_args(["sweep.yaml"]), expected=expected) == code
    out, err = capsys.readouterr()
    assert counts in out
    assert ("--resume" in err) == (code == 130)


def test_the_driver_loads_the_task_of_a_sweep_with_random_spaces_on_run_keys(tmp_path):
    """prepare_tasks takes each grid point's task; a random space elsewhere (here β) is not a value to set
    (it once was: every sweep with a random loss or train key stopped with exit 2 before Ray)."""
    from spo_ray.config import validate_sweep
    from spo_ray.sweep import prepare_tasks
    raw = tiny_run(loss={"beta": {"loguniform": [0.01, 1]}, "name": {"grid": ["dpo", "spo"]}})
    raw["cache_dir"] = str(tmp_path)
    sweep, spaces = validate_sweep(raw)
    prepare_tasks(raw, spaces, sweep)  # raised ConfigError: "loss.beta: input should be a valid number"


def test_one_line_error_unwraps_to_the_innermost_message():
    from spo_ray.distributed import one_line_error
    try:
        try:
            raise ValueError("disk full\nsecond line")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert one_line_error(outer) == "ValueError: disk full"
    trace = RuntimeError("Traceback (most recent call last):\n  File 'x.py'\nOSError: no such init\n")
    assert one_line_error(trace) == "OSError: no such init"
    assert one_line_error(None) == ""


class CheckpointedTrial:
    """What `recover_lost_checkpoint` reads of a Tune trial: its id, Ray's checkpoint manager, the latest result."""
    def __init__(self, trial_id, manager):
        from ray.tune.trainable.metadata import _TrainingRunMetadata
        self.trial_id, self.status = trial_id, "PENDING"
        self.run_metadata = _TrainingRunMetadata()  # Tune's own: it saves a trial's checkpoints from a cached JSON
        self.run_metadata.checkpoint_manager = manager

    @property
    def latest_checkpoint_result(self):
        return self.run_metadata.checkpoint_manager.latest_checkpoint_result


@pytest.mark.parametrize("case", ["latest there", "older tracked", "uploaded later", "none left"])
def test_a_resumed_trial_whose_latest_checkpoint_is_gone_takes_the_newest_one_left(tmp_path, case):
    """Tune's saved state tracks checkpoints 1 and 2 of a trial (keep_checkpoints 2); on disk, by case: both;
    only 1 (2 was deleted after the state was saved); 1 and the complete 4 uploaded after it (3 half-written:
    no trainer state); none."""
    import pyarrow.fs
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata
    from spo_ray.sweep import recover_lost_checkpoint

    fs = pyarrow.fs.LocalFileSystem()
    folder = tmp_path / "run_trial_t1"

    def checkpoint(index: int, complete: bool = True) -> str:
        path = folder / f"checkpoint_{index:06d}"
        path.mkdir(parents=True)
        (path / ("trainer_state.pt" if complete else ".metadata.json")).write_bytes(b"state")
        return str(path)

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    for index in (1, 2):
        path = checkpoint(index)
        manager.register_checkpoint(_TrainingResult(Checkpoint(path, fs), metrics={"step": 10 * index}))
    if case != "latest there":
        shutil.rmtree(folder / "checkpoint_000002")
    if case == "uploaded later":
        checkpoint(3, complete=False)
        checkpoint(4)
    if case == "none left":
        shutil.rmtree(folder / "checkpoint_000001")
    trial = CheckpointedTrial("t1", manager)
    trial.run_metadata.get_json_state()  # cached, as by the sweep's last save

    line = recover_lost_checkpoint(trial)
    latest = trial.latest_checkpoint_result
    saved = _TrainingRunMetadata.from_json_state(trial.run_metadata.get_json_state()).checkpoint_manager
    assert (saved.latest_checkpoint_result and saved.latest_checkpoint_result.checkpoint.path) == \
        (latest and latest.checkpoint.path)  # what the next save writes is the repair
    lost = str(folder / "checkpoint_000002")
    if case == "latest there":
        assert line is None and latest.checkpoint.path == lost and latest.metrics == {"step": 20}
        return
    assert line.startswith(f"trial t1: its latest checkpoint {lost} is not in the store; it resumes ")
    kept = [Path(r.checkpoint.path).name for r in manager.best_checkpoint_results]
    if case == "older tracked":
        assert latest.metrics == {"step": 10} and kept == ["checkpoint_000001"]
        assert line.endswith(f"from {folder / 'checkpoint_000001'}")
    elif case == "uploaded later":
        assert Path(latest.checkpoint.path).name == "checkpoint_000004" and latest.metrics == {}
        assert kept == ["checkpoint_000001", "checkpoint_000004"]
    else:
        assert latest is None and kept == [] and line.endswith("from the start: none of its checkpoints is left")
    assert recover_lost_checkpoint(trial) is None  # repaired: Tune's restore finds it

# ---------------------------------------------------------------------------------------------------
# Slow: Ray Tune and Ray Train end to end

@pytest.mark.slow
def test_the_smoke_sweep_runs_through_tune_and_its_report_shows_its_numbers(tmp_path):
    """sweeps/smoke.yaml as shipped (its inits built into tmp_path), then `python -m analysis.report` on it:
    the report's tables carry the trials' own final metrics."""
    result = run_cli(ROOT / "sweeps" / "smoke.yaml", "--storage-path", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    directory = tmp_path / "smoke"
    results = pd.read_csv(directory / "results.csv", keep_default_na=False)
    assert set(REQUIRED_COLUMNS) <= set(results.columns)
    assert sorted(results["loss"]) == ["dpo", "spo"] and set(results["status"]) == {"TERMINATED"}
    assert set(results["step"]) == {6}
    history = pd.read_parquet(directory / "history.parquet")
    assert {"trial_id", "step", "train/loss"} <= set(history.columns)
    assert sorted(history.groupby("trial_id")["step"].apply(list).tolist()) == [[2, 3, 4, 6], [2, 3, 4, 6]]
    swept = yaml.safe_load((directory / "sweep.yaml").read_text())
    assert swept["swept"] == ["loss.name"] and swept["loss"]["name"] == {"grid": ["dpo", "spo"]}
    assert any((directory / "reference_cache").iterdir())
    [started] = json.loads((directory / "environment.json").read_text())  # what produced these results
    assert started["torch"] == torch.__version__ and started["ray"] == ray.__version__

    report = subprocess.run([sys.executable, "-m", "analysis.report", str(directory)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    summary = pd.read_csv(directory / "tables" / "summary.csv").set_index("loss")
    final = results.set_index("loss")
    for loss in ("dpo", "spo"):  # one seed each: the mean is the trial's value, n is 1
        assert summary.loc[loss, "n"] == 1
        for metric in ("eval/accuracy", "eval/chosen_logp_delta", "eval/rejected_logp_delta"):
            assert summary.loc[loss, f"{metric} mean"] == pytest.approx(float(final.loc[loss, metric]))
    text = (directory / "report.md").read_text()
    for loss in ("dpo", "spo"):
        assert f"| {loss} | 1 | {float(final.loc[loss, 'eval/accuracy']):.3f} |" in text
    plot = directory / "plots" / "logp_evolution.png"
    assert "(plots/logp_evolution.png)" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_sweep_samples_its_pairs_on_ray_workers_once_and_every_trial_reads_them(tmp_path):
    """Two trials of sampled pairs (DPO at two βs), in two self-training rounds: the driver samples round 1's table on two Ray
    actors before the first trial, with the rows an in-process sampler gives for the same seed; both trials
    train round 1 on the pairs built from it and report the sampler's figures; the initial evaluation is
    computed once; each trial then samples its own round-2 table from its own weights."""
    from spo_ray.config import validate_run
    from spo_ray.sampling import read_samples, table_path
    from spo_ray.tasks import load_task, sampling_job

    sampled = {"samples_per_prompt": 4, "prompts": 32, "eval_prompts": 8, "temperature": 1.0, "max_new_tokens": 4,
               "batch_tokens": 400, "rounds": 2, "steps_per_round": 3}
    # Two βs: weights that differ after round 1 whatever the samples (DPO and SPO can end round 1 equal to the
    # digit where SPO's penalty never acts, and then share one round-2 table).
    path = tiny_sweep(tmp_path, loss={"name": "dpo", "beta": {"grid": [0.1, 0.5]}}, data={"sampled_pairs": sampled},
                      train={"eval_on_start": True, "max_steps": 3})
    result = run_cli(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 worker(s)" in result.stdout + result.stderr
    cache = tmp_path / "results" / ".cache"
    tables = sorted((cache / "samples").glob("samples-*.parquet"))
    assert len(tables) == 3  # round 1's, shared; each trial's round 2
    [_] = (cache / "evaluations").glob("init-eval-*.json")

    raw = yaml.safe_load(path.read_text())
    raw["loss"]["beta"] = 0.1
    config = validate_run(raw).run_config()
    job = sampling_job(load_task(config, str(cache)), config, str(cache))
    table = Path(table_path(str(cache / "samples"), job.key))
    assert table in tables
    rows, generation = read_samples(str(table))
    assert rows == sorted(job.generate()[0], key=lambda r: (r["prompt"], r["sample"]))  # sharing changed nothing
    assert generation["workers"] == 2

    results = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    history = pd.read_parquet(tmp_path / "results" / "tiny" / "history.parquet")
    assert set(results["status"]) == {"TERMINATED"} and set(results["round"]) == {2} and set(results["step"]) == {6}
    assert sorted(zip(history["step"], history["round"])) == [(0, 1), (0, 1), (3, 1), (3, 1), (6, 2), (6, 2)]
    round_one = history[history["step"] == 3]
    trial = load_task(config, str(cache), samples_dir=str(cache / "samples"))
    assert set(round_one["sampler/pairs"]) == {len(trial.train_pairs)}
    # round 2's figures are each trial's own table: 32 training prompts, no held-out ones
    assert set(history.loc[history["step"] == 6, "sampler/samples"]) == {32 * 4}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_workers_follow_the_one_worker_loss_trajectory(tmp_path, init_cache, strategy):
    """Ray Train with 2 workers × 8 pairs (DDP replicas, or FSDP shards) = one in-process worker with the
    same global batch of 16."""
    from spo_ray.config import validate_run
    from spo_ray.trainer import train

    config = tiny_sweep(tmp_path, name=strategy,
                        scaling={"num_workers": 2, "cpus_per_worker": 1, "strategy": strategy},
                        train={"max_steps": 6, "log_every": 1, "eval_every": 3, "num_threads": 1})
    result = run_cli(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    directory = tmp_path / "results" / strategy
    results = pd.read_csv(directory / "results.csv", keep_default_na=False)
    assert list(results["status"]) == ["TERMINATED"]
    assert any((directory / "ray_train").iterdir())  # the TorchTrainer's own run folder with its checkpoint
    distributed = pd.read_parquet(directory / "history.parquet").set_index("step")

    rows = []
    raw = yaml.safe_load(config.read_text())
    train(validate_run(raw).run_config(), cache_dir=str(tmp_path / "results" / ".cache"),
          reference_dir=str(tmp_path / "single_ref"), report=lambda metrics, state: rows.append(metrics))
    single = pd.DataFrame(rows).set_index("step")

    assert list(distributed.index) == list(single.index) == [1, 2, 3, 4, 5, 6]
    for column in ("train/loss", "train/chosen_logp_delta", "train/grad_norm", "eval/loss"):
        both = distributed[column].dropna(), single[column].dropna()
        assert len(both[0]) == len(both[1]) > 0
        assert both[0].to_numpy() == pytest.approx(both[1].to_numpy(), rel=1e-3, abs=1e-4), column


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config = tiny_sweep(tmp_path, name="resume", loss={"name": {"grid": ["dpo", "spo"]}},
                        train={"max_steps": 60, "log_every": 5, "eval_every": 30, "checkpoint_every": 10},
                        tune={"max_concurrent_trials": 1})
    directory = tmp_path / "results" / "resume"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, "-m", "spo_ray.sweep", str(config)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    finished = None
    while time.time() < deadline and process.poll() is None:
        if (directory / "results.csv").exists():
            results = pd.read_csv(directory / "results.csv", keep_default_na=False)
            if (results["status"] == "TERMINATED").any():
                finished = results[results["status"] == "TERMINATED"].iloc[0].to_dict()
                break
        time.sleep(0.02)  # interrupt soon after: often before Tune has made the second trial (no row yet)
    assert finished is not None, "no trial finished in time"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    interrupted = pd.read_csv(directory / "results.csv", keep_default_na=False)
    # With one trial at a time Tune creates the second trial only once the first has ended, so the
    # interruption may come before it has a row at all: count finished trials, not unfinished rows.
    assert (interrupted["status"] == "TERMINATED").sum() < 2, "the sweep finished before the interruption"
    assert process.returncode == 130, output[-3000:]

    result = run_cli(config, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = pd.read_csv(directory / "results.csv", keep_default_na=False)
    assert len(results) == 2 and results["trial_id"].is_unique
    assert set(results["status"]) == {"TERMINATED"}
    again = results.set_index("trial_id").loc[finished["trial_id"]]
    assert float(again["wall_time_s"]) == float(finished["wall_time_s"])  # the finished trial was not re-run
    history = pd.read_parquet(directory / "history.parquet")
    assert not history.duplicated(["trial_id", "step"]).any()
    assert sorted(history.groupby("trial_id")["step"].max()) == [60, 60]


# ---------------------------------------------------------------------------------------------------
# Slow: search beyond the grid (issue 23)

def checkpoint_states(directory: Path) -> dict[tuple[str, int], Path]:
    """(writer trial, step) → the checkpoint file, over every trial folder of an experiment."""
    import torch
    found = {}
    for path in directory.glob("run_trial_*/checkpoint_*/trainer_state.pt"):
        state = torch.load(path, weights_only=True)
        found[(state["trial_id"], state["step"])] = path
    return found


@pytest.mark.slow
def test_pbt_hands_the_donors_checkpoint_on_and_a_resumed_sweep_keeps_its_schedulers_state(tmp_path, init_cache):
    """A PBT sweep of 3 tiny trials (one copies another at each round), interrupted once its first exploit is
    in the history, and resumed:

    - every exploit is recorded once (receiver, donor, step) and the receiver's λ changed there, in the loss
      (train/spo_lambda) as in the recorded value (hp/spo_lambda);
    - the receiver went on from the donor's checkpoint: the same steps trained here, from that checkpoint
      with the receiver's new values, give its rows;
    - the resumed scheduler counted on from the interrupted one: its count of perturbations is at least the
      number of exploits in the history (a fresh PBT would start again from 0).
    """
    from spo_ray.config import validate_run
    from spo_ray.trainer import train

    config = tiny_sweep(tmp_path, name="pbt", loss={"name": "spo", "spo_lambda": {"loguniform": [0.1, 10]}},
                        train={"max_steps": 12, "log_every": 2, "eval_every": 4, "checkpoint_every": 4},
                        tune={"scheduler": "pbt", "num_samples": 3, "metric": "eval/loss", "mode": "min",
                              "perturbation_interval": 4, "keep_checkpoints": 20,
                              "mutations": {"loss.spo_lambda": {"loguniform": [0.1, 10]},
                                            "train.learning_rate": {"choice": [3e-4, 1e-3, 3e-3]}}})
    raw = yaml.safe_load(config.read_text())
    del raw["tune"]["max_concurrent_trials"]  # PBT takes none: the CPUs limit the trials running at once
    config.write_text(yaml.safe_dump(raw))
    directory = tmp_path / "results" / "pbt"
    process = subprocess.Popen([sys.executable, "-m", "spo_ray.sweep", str(config)], cwd=ROOT,
                               env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline, state_file = time.time() + 180, directory / "pbt_state.yaml"

    def exploit_recorded() -> bool:
        # Interrupted once the first exploit is in the history, not as soon as the scheduler counts it: a SIGINT
        # between the two can lose that exploit on --resume (the receiver goes on from its own checkpoint) while
        # pbt_state.yaml has counted it — seen in a fresh-clone CI run (count 2, one exploit in the history);
        # left open (closing note, 2026-12-07). A later perturbation can still be caught by the SIGINT.
        try:
            history = pd.read_parquet(directory / "history.parquet")
        except (OSError, ValueError):  # not written yet, or being rewritten
            return False
        return "exploit/step" in history and history["exploit/step"].notna().any()
    while time.time() < deadline and process.poll() is None:
        if exploit_recorded():
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    interrupted = yaml.safe_load(state_file.read_text())["num_perturbations"]

    result = run_cli(config, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = pd.read_parquet(directory / "history.parquet")
    assert not history.duplicated(["trial_id", "step"]).any()
    assert set(history.groupby("trial_id")["step"].max()) == {12}
    exploits = history.dropna(subset=["exploit/step"])
    final_count = yaml.safe_load(state_file.read_text())["num_perturbations"]
    # Counted on from the interrupted scheduler: at least every exploit in the history, one of them from before
    # the interrupt (a fresh PBT would count only those after it). More where an exploit decided just before the
    # SIGINT was lost by Tune's saved state (the known race above).
    assert final_count > interrupted and final_count >= len(exploits) > 0
    assert set(exploits["exploit/step"]) <= {4, 8}  # at perturbation steps, never at the end (12)

    checkpoints = checkpoint_states(directory)
    for _, receiver in exploits.iterrows():
        assert receiver["train/spo_lambda"] == pytest.approx(receiver["hp/spo_lambda"], rel=1e-6)  # in the loss
        # Explored within the declared range: the donor's value × 0.8 or × 1.2, clipped to [0.1, 10], or drawn
        # afresh. It need not differ from the receiver's own value before, nor from the donor's: a receiver
        # exploited twice by one donor can draw the same × 0.8 twice, and a clip lands on the donor's 0.1 (both
        # seen). That the exploit took effect is the replay below: the donor's checkpoint, the new values.
        assert 0.1 <= receiver["hp/spo_lambda"] <= 10

    # One receiver's steps after its exploit, trained here from the donor's checkpoint with its new values.
    import torch
    receiver = exploits.iloc[0]
    at, first = int(receiver["exploit/step"]), int(receiver["step"])
    state = torch.load(checkpoints[(receiver["exploit/donor"], at)], weights_only=True)
    replay = copy_with(raw, spo_lambda=float(receiver["hp/spo_lambda"]),
                       learning_rate=float(receiver["hp/learning_rate"]))
    rows_here = []
    train(validate_run(replay).run_config(), cache_dir=init_cache, reference_dir=str(tmp_path / "replay_ref"),
          resume=state, report=lambda metrics, _: rows_here.append(metrics))
    here = {row["step"]: row for row in rows_here}
    for column in ("train/loss", "train/chosen_logp_delta", "train/learning_rate"):
        assert here[first][column] == pytest.approx(receiver[column], rel=1e-5, abs=1e-6), column


def copy_with(raw: dict, spo_lambda: float, learning_rate: float) -> dict:
    """The tiny sweep as the receiver ran after its exploit: its mutated values, no search spaces left."""
    import copy
    replay = copy.deepcopy(raw)
    replay["loss"]["spo_lambda"] = spo_lambda
    replay["train"]["learning_rate"] = learning_rate
    del replay["tune"]
    return replay


@pytest.mark.slow
def test_optuna_runs_each_suggestion_for_every_seed_through_tune(tmp_path):
    config = tiny_sweep(tmp_path, name="optuna", loss={"name": "spo", "spo_lambda": {"loguniform": [0.1, 10]}},
                        train={"seed": {"grid": [0, 1]}, "max_steps": 4, "eval_every": 4, "log_every": 2},
                        tune={"search": "optuna", "num_samples": 2, "startup_trials": 1, "metric": "eval/loss",
                              "mode": "min", "points_to_evaluate": [{"loss.spo_lambda": 1.0}]})
    result = run_cli(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = pd.read_csv(tmp_path / "results" / "optuna" / "results.csv", keep_default_na=False)
    assert len(results) == 4 and set(results["status"]) == {"TERMINATED"}
    by_lambda = results.groupby("spo_lambda")["seed"].apply(sorted)
    assert list(by_lambda) == [[0, 1]] * 2  # two suggestions, each for both seeds
    assert results["spo_lambda"].iloc[0] == 1.0  # points_to_evaluate first


@pytest.mark.slow
def test_a_tune_metric_no_trial_reports_stops_the_sweep_at_the_first_report_with_exit_2(tmp_path):
    """A name the config cannot refuse on its own (unlike every known metric) costs one report, not the
    budget: Tune stops as on Ctrl+C, and the sweep exits 2 with the one line naming the metric."""
    config = tiny_sweep(tmp_path, name="metric", loss={"name": {"grid": ["dpo", "spo"]}},
                        train={"max_steps": 200, "log_every": 5, "eval_every": 100},
                        tune={"max_concurrent_trials": 1, "metric": "eval/brand_new_metric", "mode": "max"})
    result = run_cli(config)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "eval/brand_new_metric" in lines[0] and "Traceback" not in result.stderr
    results = pd.read_csv(tmp_path / "results" / "metric" / "results.csv", keep_default_na=False)
    assert not (results["status"] == "TERMINATED").any()  # stopped at the first report, before any trial ended
