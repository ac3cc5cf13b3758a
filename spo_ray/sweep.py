"""`python -m spo_ray.sweep SWEEP.yaml [--dry-run] [--resume] [--storage-path DIR] [--name NAME] [--set KEY=VALUE ...]`

Runs a sweep through Ray Tune, in this order:

  1. read the YAML, apply `--set`, validate every key and every value a search space can take — before
     Ray starts, so bad input is one `error:` line and exit code 2;
  2. `--dry-run`: print the trials and stop (Ray is not imported);
  3. load each grid point's task once: build the built-in initializations into the shared init cache,
     read and validate pair data files (bad data is exit code 2 too, before Ray starts);
  4. start Ray (`ray.init()`: a local cluster, or the one `RAY_ADDRESS` names) and run the trials
     (`spo_ray.distributed.run_trial`): grid and random points (Tune's variant generator) or Optuna's
     suggestions, each for every seed (`tune.search`), under a FIFO, ASHA or PBT scheduler (`spo_ray.search`);
  5. while results arrive, rewrite `results.csv` (one row per trial) and `history.parquet` (every
     reported row) in the experiment directory `<storage_path>/<name>/`.

Exit codes: 0 every trial finished; 1 some trials ended ERROR or DIVERGED (results.csv lists them with their
error); 2 bad input (also a tune.metric that the trials' first report lacks: the sweep stops there); 130
interrupted by Ctrl+C or SIGTERM (continue with `--resume`: finished trials are not run again).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shlex
import signal
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from spo_ray import environment, ray_internals, storage
from spo_ray.cli import EXIT_OK, EXIT_TRIALS_FAILED, user_errors_exit_2
from spo_ray.config import (ROUND_KEY, ConfigError, SweepConfig, apply_overrides, check_batch_size, column_name,
                            first_point, get_dotted, grid_points, load_yaml, metric_is_used, missing_metric,
                            set_dotted, to_plain, total_steps, trial_columns, validate_run, validate_sweep)
from spo_ray.distributed import (ERROR_KEY, TRIAL_STATUS_KEY, experiment_dir, init_cache_dir,
                                 one_line_error, start_build_locks, uses_ray_train, worker_resources)
from spo_ray.tracking import resolve_mode

EXIT_INTERRUPTED = 130
RESULTS_FILE, HISTORY_FILE, SWEEP_FILE = "results.csv", "history.parquet", "sweep.yaml"
#: Prefixes of the values a trial reports; hp/ and exploit/ only under PBT (spo_ray.distributed.population_columns),
#: sampler/ only with data.sampled_pairs; round/ (and the `round` column) only in self-training rounds.
METRIC_PREFIXES = ("eval/", "train/", "probe/", "sampler/", "hp/", "exploit/", "round/")
#: Shown in Tune's progress table next to the swept parameters.
PROGRESS_METRICS = {"step": "step", "train/loss": "train loss", "eval/accuracy": "eval acc",
                    "eval/chosen_logp_delta": "Δ logp(y_w)", "eval/rejected_logp_delta": "Δ logp(y_l)"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m spo_ray.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the sweep YAML (see sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="list the trials and exit without starting Ray")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep in the same experiment directory")
    parser.add_argument("--storage-path", help="where experiment directories go (overrides storage_path)")
    parser.add_argument("--name", help="the experiment's name (overrides name)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys, e.g. --set loss.beta=0.3 'train.seed={grid: [0, 1]}'")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The sweep before Ray: validated config, trial list, inits

def resolve(raw: dict, args) -> tuple[dict, SweepConfig, dict[str, dict]]:
    """Overrides applied, validated; storage and cache paths made absolute so trials find them anywhere."""
    raw = apply_overrides(raw, args.overrides)
    if args.storage_path:
        raw["storage_path"] = args.storage_path
    if args.name:
        raw["name"] = args.name
    sweep, spaces = validate_sweep(raw)
    if pin_engine(raw, sweep.scaling.use_gpu):
        sweep, spaces = validate_sweep(raw)
    if not sweep.name or "/" in sweep.name or sweep.name.startswith("."):
        raise ConfigError(f"name: {sweep.name!r} must be a plain folder name")
    raw = copy.deepcopy(raw)
    raw["storage_path"] = storage.absolute(sweep.storage_path)
    raw["cache_dir"] = init_cache_dir(sweep)
    sweep = sweep.model_copy(update={"storage_path": raw["storage_path"], "cache_dir": raw["cache_dir"]})
    return raw, sweep, spaces


def pin_engine(raw: dict, use_gpu: bool) -> bool:
    """`data.sampled_pairs.engine` and `data.eval_engine` resolved once here, for the workers the sweep asks
    for (`scaling.use_gpu`), instead of in each process: the driver samples round 1's table on the workers and
    each trial samples its later rounds itself, and all of them must key their tables by the same engine (a
    CPU driver would otherwise key round 1 as spo-ray's and GPU trials look for vLLM's); the trials share
    their initial evaluation by a key that holds the evaluator's engine. `vllm` where it is not installed is
    bad input here, before any trial. True where it changed `raw`."""
    from spo_ray.engines import GREEDY_SOURCES, resolve_engine
    data = raw.setdefault("data", {})  # validated already: a mapping where present
    before = {"sampled_pairs": dict(data["sampled_pairs"]) if isinstance(data.get("sampled_pairs"), dict) else None,
              "eval_engine": data.get("eval_engine")}
    if isinstance(data.get("sampled_pairs"), dict):
        spec = data["sampled_pairs"]
        spec["engine"] = resolve_engine(spec.get("engine", "auto"), gpu=use_gpu)
    engine = resolve_engine(data.get("eval_engine", "auto"), gpu=use_gpu, key="data.eval_engine")
    if data.get("source", "arithmetic") not in GREEDY_SOURCES and data.get("eval_engine", "auto") == "auto":
        engine = "spo_ray"  # nothing for vLLM to decode there
    data["eval_engine"] = engine
    return before != {"sampled_pairs": data.get("sampled_pairs"), "eval_engine": data["eval_engine"]}


def trial_table(sweep: SweepConfig, spaces: dict[str, dict], raw: dict) -> list[dict]:
    """What `--dry-run` prints: every grid point × num_samples, numbered from 1."""
    points = grid_points(raw, spaces) or [{}]
    return [{"trial": i + 1, **point} for i, point in
            enumerate(p for _ in range(sweep.tune.num_samples) for p in points)]


def print_trial_table(rows: list[dict], sweep: SweepConfig) -> None:
    keys = [k for k in rows[0] if k != "trial"]
    header = ["trial"] + keys
    cells = [[str(row[k]) for k in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    path = "Ray Train (TorchTrainer)" if uses_ray_train(sweep) else "in-process"
    tune = sweep.tune
    how = (f"; optuna ({tune.sampler}, seed {tune.seed}) suggests the random values, {tune.num_samples} suggestions "
           f"× every seed" if tune.search == "optuna" else "")
    if tune.scheduler == "pbt":
        how += (f"; PBT mutates {', '.join(tune.mutations)} every {tune.perturbation_interval} steps "
                f"(seed {tune.seed})")
    print(f"{len(rows)} trials, {sweep.scaling.num_workers} worker(s) each, {path}{how}; "
          f"experiment directory {experiment_dir(sweep)}")


def prepare_tasks(raw: dict, spaces: dict[str, dict], sweep: SweepConfig) -> list:
    """Load the task of every grid point once, before Ray starts: build the built-in initializations it
    needs and read and validate its pair data. Returns the run configs of the points whose pairs are
    sampled (`data.sampled_pairs`), for `prepare_samples` once Ray is up.

    Two trials that found an init missing would both build it (minutes each, on the CPUs the other trials
    need); building them here uses the whole machine for one copy. A bad data file (a missing column, a
    malformed row, nothing left after filtering) or a batch larger than the pairs is bad input: found here
    it is one `error:` line and exit code 2, not a sweep of ERROR trials. Hub datasets too: a wrong id,
    split or column fails here once instead of in every trial, and the download lands in the Hugging Face
    cache that trials on this machine then read. Points whose model or data sections are sampled at random
    are left to the trials.
    """
    from spo_ray.rounds import check_prompt_pool
    from spo_ray.tasks import load_task, sampling_job

    if any(k.startswith(("model.", "data.")) and "grid" not in s for k, s in spaces.items()):
        return []
    train_pairs: dict[str, int] = {}
    sampled = []
    for config in point_configs(raw, spaces):
        identity = json.dumps([to_plain(config.model), to_plain(config.data)], sort_keys=True)
        if identity not in train_pairs:
            hub = config.data.source == "hub"
            if hub:
                print(f"reading hub dataset {config.data.path} (a download, unless cached)")
            with quiet_datasets() if hub else nullcontext():  # no per-split bars before an error line
                task = load_task(config, cache_dir=sweep.cache_dir, progress=True)
            train_pairs[identity] = len(task.train_pairs)
            if config.data.sampled_pairs is not None:
                sampling_job(task, config, sweep.cache_dir)  # a source that cannot check answers: exit 2 now
                check_prompt_pool(task, config)  # fresh prompts for every round: exit 2 now
                sampled.append(config)
        if config.data.sampled_pairs is None:  # sampled pairs are counted once they exist (prepare_samples)
            check_batch_size(config.train, train_pairs[identity], sweep.scaling.num_workers)
    return sampled


def point_configs(raw: dict, spaces: dict[str, dict]) -> list:
    """The run config of every grid point, in grid order (random spaces at their first value)."""
    configs = []
    for point in grid_points(raw, spaces) or [{}]:
        concrete = copy.deepcopy(raw)
        for key, value in point.items():
            if "grid" in spaces[key]:  # a random space's entry is its description; first_point takes a value
                set_dotted(concrete, key, value)
        configs.append(validate_run(first_point(concrete)).run_config())
    return configs


def prepare_samples(configs: list, sweep: SweepConfig) -> None:
    """Sample every table the sweep's trials will read, before the first trial starts, spread over the
    cluster (`spo_ray.distributed.sample_on_cluster`), then build each grid point's pairs once: a sampler
    that yields none, or fewer than a batch, is bad input (exit 2) before any trial runs. An SFT-on-samples
    init (`model.sft_steps`) is built here too, with the driver's whole machine."""
    from spo_ray.distributed import sample_on_cluster
    from spo_ray.sampling import read_samples, samples_dir, table_path
    from spo_ray.tasks import load_task, sampling_job

    directory = samples_dir(sweep.cache_dir)
    done: set[str] = set()
    checked: set[str] = set()
    for config in configs:
        job = sampling_job(load_task(config, cache_dir=sweep.cache_dir), config, sweep.cache_dir)
        if job.key not in done and read_samples(table_path(directory, job.key)) is None:
            sample_on_cluster(job, directory, sweep)
        done.add(job.key)
        identity = json.dumps([to_plain(config.model), to_plain(config.data)], sort_keys=True)
        if identity not in checked:
            checked.add(identity)
            task = load_task(config, cache_dir=sweep.cache_dir, progress=True, samples_dir=directory)
            print(f"sampled pairs: {int(task.metrics['sampler/pairs'])} training pairs from "
                  f"{int(task.metrics['sampler/prompts'])} prompts (samples {task.metrics['sampler/sample_accuracy']:.0%} "
                  f"correct; {task.metrics['sampler/prompts_with_pair']:.0%} of the prompts gave a pair)")
            check_batch_size(config.train, len(task.train_pairs), sweep.scaling.num_workers)


@contextmanager
def quiet_datasets():
    """`datasets` without its progress bars, restored afterwards."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def write_sweep_file(sweep: SweepConfig, spaces: dict[str, dict], directory: str) -> None:
    """sweep.yaml: the resolved config (defaults filled in), the search spaces in place, the swept keys."""
    from spo_ray.results import write_yaml
    resolved = to_plain(sweep)
    for key, space in spaces.items():
        set_dotted(resolved, key, space)
    resolved["swept"] = list(spaces)
    write_yaml(resolved, storage.join(directory, SWEEP_FILE))


# ---------------------------------------------------------------------------------------------------
# Search spaces → Tune

def tune_space(space: dict):
    from ray import tune
    kind, spec = next(iter(space.items()))
    if kind == "grid":
        return tune.grid_search(list(spec))
    if kind == "choice":
        return tune.choice(list(spec))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*spec)


def param_space(raw: dict, spaces: dict[str, dict]) -> dict:
    space = copy.deepcopy(raw)
    for key, spec in spaces.items():
        set_dotted(space, key, tune_space(spec))
    return space


# ---------------------------------------------------------------------------------------------------
# The two tables, rewritten as results arrive

class ResultTables:
    """A Tune callback (wrapped by `tables_callback`) that keeps results.csv and history.parquet current.

    State lives on disk: `setup` reads the tables back, so a resumed sweep keeps the rows of trials that
    finished before the interruption, and a trial that restarts from a checkpoint replaces its rows from
    that step on (each step of each trial appears once).

    In a bucket each rewrite is an upload of both whole tables, so there a reported row is written at most
    every `BUCKET_WRITE_INTERVAL_S`; a trial's start and end, and the sweep's end, are written at once.
    """

    BUCKET_WRITE_INTERVAL_S = 10.0

    def __init__(self, directory: str, swept: list[str], store_down: Callable | None = None):
        self.directory = directory  # a local folder or a storage URI
        self.swept = swept
        # Called with the StoreUnavailable error when a write finds the store gone for good; then the rows
        # stay in memory and are not written again (without it, the error is raised).
        self.store_down, self.store_error = store_down, None
        self.rows: dict[str, dict] = {}       # trial_id -> results row
        self.history: dict[str, list[dict]] = {}
        self.min_interval_s = self.BUCKET_WRITE_INTERVAL_S if storage.is_uri(directory) else 0.0
        self.written_at, self.unwritten = float("-inf"), False

    def load(self) -> None:
        from spo_ray.results import read_csv, read_parquet
        results, history = storage.join(self.directory, RESULTS_FILE), storage.join(self.directory, HISTORY_FILE)
        if storage.exists(results):
            frame = read_csv(results, dtype={"trial_id": str, "error": str}, keep_default_na=False)
            self.rows = {row["trial_id"]: row for row in frame.to_dict("records")}
        if storage.exists(history):
            for row in read_parquet(history).to_dict("records"):
                clean = {k: v for k, v in row.items() if not _is_missing(v)}
                self.history.setdefault(str(row["trial_id"]), []).append(clean)

    def trial_added(self, trial) -> None:
        if trial.trial_id not in self.rows:
            self.rows[trial.trial_id] = {"trial_id": trial.trial_id, "status": "PENDING", "error": "",
                                         **self.parameters(trial)}
            self.write()

    def parameters(self, trial) -> dict:
        config = validate_run(trial.config)
        point = {key: get_dotted(trial.config, key) for key in self.swept}
        return trial_columns(point, config)

    def set_status(self, trial, status: str, error: str = "") -> None:
        self.trial_added(trial)
        self.rows[trial.trial_id].update(status=status, error=error)
        self.write()

    def result(self, trial, result: dict) -> None:
        self.trial_added(trial)
        metrics = {k: v for k, v in result.items()
                   if k.startswith(METRIC_PREFIXES) or k in ("step", "wall_time_s", ROUND_KEY)}
        steps = self.history.setdefault(trial.trial_id, [])
        if "step" in metrics:  # a restarted trial re-reports from its checkpoint on: keep the new rows
            steps[:] = [row for row in steps if row["step"] < metrics["step"]]
        steps.append({"trial_id": trial.trial_id, **metrics})
        row = self.rows[trial.trial_id]
        # A per-question list (e.g. eval/answers_correct) is history's, not a cell of results.csv.
        row.update({k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))})
        row.update(status=result.get(TRIAL_STATUS_KEY, "RUNNING"), error=result.get(ERROR_KEY, ""))
        self.write(soon=True)

    def complete(self, trial) -> None:
        row = self.rows.get(trial.trial_id, {})
        status = row.get("status") if row.get("status") in ("DIVERGED", "ERROR") else "TERMINATED"
        self.set_status(trial, status, row.get("error", "") if status != "TERMINATED" else "")

    def write(self, soon: bool = False) -> None:
        """Rewrite both tables; with `soon`, only when the last write is `min_interval_s` old (else later)."""
        import time

        import pandas as pd
        from spo_ray.results import write_csv, write_parquet
        if self.store_error or (soon and time.monotonic() - self.written_at < self.min_interval_s):
            self.unwritten = True
            return
        self.written_at, self.unwritten = time.monotonic(), False
        frame = pd.DataFrame(list(self.rows.values()))
        history = [row for rows in self.history.values() for row in rows]
        try:  # history first: once results.csv says a trial ended, its every row is in history.parquet
            if history:
                rows = pd.DataFrame(history)
                write_parquet(rows[_column_order(rows.columns)], storage.join(self.directory, HISTORY_FILE))
            write_csv(frame[_column_order(frame.columns)], storage.join(self.directory, RESULTS_FILE))
        except storage.StoreUnavailable as error:
            if self.store_down is None:
                raise
            self.store_error, self.unwritten = error, True
            self.store_down(error)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


def _column_order(columns) -> list[str]:
    """trial_id, status, error, the parameters, then eval/*, train/*, probe/*, step, wall_time_s."""
    columns = list(columns)
    head = [c for c in ("trial_id", "status", "error") if c in columns]
    metrics = [c for prefix in METRIC_PREFIXES for c in columns if c.startswith(prefix)]
    tail = [c for c in ("step", "wall_time_s") if c in columns]
    params = [c for c in columns if c not in head + metrics + tail]
    return head + params + metrics + tail


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def trial_error(trial):
    """The error that ended a Tune trial. Tune writes it into the trial's local folder first and copies it
    to the storage path (where `Trial.get_pickled_error` looks) only later, so read the local file."""
    from ray import cloudpickle
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        with open(trial.pickled_error_file, "rb") as handle:
            return cloudpickle.load(handle)
    if trial.error_file and os.path.exists(trial.error_file):
        return RuntimeError(Path(trial.error_file).read_text())  # a text trace; one_line_error takes its end
    return trial.get_pickled_error() or trial.get_error()


def tables_callback(directory: str, swept: list[str]):
    """The Tune callback around `ResultTables` (a factory, so that importing this module needs no Ray)."""
    from ray.tune import Callback

    def stop_sweep(error: storage.StoreUnavailable) -> None:
        """The store is gone for good: stop as Ctrl+C does (Tune stops the trials and keeps its state); the
        tables in the store hold every row up to the outage, and `--resume` reruns from the checkpoints."""
        print(f"error: {error}; stopping the sweep", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGINT)

    class WriteResultTables(Callback):
        def __init__(self):
            self.tables = ResultTables(directory, swept, store_down=stop_sweep)

        def setup(self, **info):
            self.tables.load()

        def on_step_end(self, iteration, trials, **info):
            for trial in trials:
                if trial.trial_id not in self.tables.rows:
                    self.tables.trial_added(trial)
            if self.tables.unwritten:
                self.tables.write(soon=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.tables.set_status(trial, "RUNNING")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.tables.result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.tables.complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.tables.set_status(trial, "ERROR", one_line_error(trial_error(trial)))

        def on_experiment_end(self, trials, **info):
            # A trial still RUNNING here was interrupted (Ctrl+C, SIGTERM): Tune saved it as unfinished but
            # then stops it as TERMINATED, so do not copy Tune's status; PAUSED says `--resume` continues it.
            for row in self.tables.rows.values():
                if row["status"] == "RUNNING":
                    row["status"] = "PAUSED"
            self.tables.write()

    return WriteResultTables()


def metric_callback(metric: str, found: list[str]):
    """The Tune callback that stops the sweep at the first report that should hold `tune.metric` and does not
    (`spo_ray.config.missing_metric`): a name the config alone cannot refuse (a metric only some losses
    report, or one the config's list does not know) costs one report, not the whole budget. It stops as
    Ctrl+C does and leaves the line in `found`, which `main` raises (exit 2)."""
    from ray.tune import Callback

    class CheckMetric(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            line = None if found else missing_metric(metric, result)
            if line:
                found.append(line)
                signal.raise_signal(signal.SIGINT)

    return CheckMetric()


# ---------------------------------------------------------------------------------------------------
# Resuming from checkpoints the saved state names but the store no longer holds

CHECKPOINT_PREFIX = "checkpoint_"  # Tune's checkpoint folders: checkpoint_000000, checkpoint_000001, …


def recover_lost_checkpoint(trial) -> str | None:
    """Point a restored trial at a checkpoint that exists, and say so; None when its latest one is there.

    Tune deletes a trial's older checkpoints (`keep_checkpoints`) as it registers a new one, but uploads its
    experiment state later, in the background: a sweep stopped in between (the store gone for good, the
    driver killed) leaves a saved state whose latest checkpoint is deleted, and Tune's restore of that trial
    fails ("does not exist on storage anymore"). The trial resumes instead from the newest checkpoint that
    is there: one uploaded to its folder after the state was saved (holding the trainer's state file), else
    the newest one the state tracks; with none, it starts over."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from spo_ray import ray_internals
    from spo_ray.distributed import CHECKPOINT_FILE

    def exists(path: str) -> bool:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    latest = trial.latest_checkpoint_result
    if latest is None:
        return None
    fs, lost = latest.checkpoint.filesystem, latest.checkpoint.path
    if exists(lost):
        return None
    manager = trial.run_metadata.checkpoint_manager
    tracked = [r for r in manager.best_checkpoint_results if exists(r.checkpoint.path)]  # in registration order
    known = {r.checkpoint.path for r in manager.best_checkpoint_results}
    folder = lost.rsplit("/", 1)[0]
    later = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
                   if info.base_name.startswith(CHECKPOINT_PREFIX) and info.path not in known
                   and exists(f"{info.path}/{CHECKPOINT_FILE}"))
    kept = tracked + [ray_internals.training_result(Checkpoint(path, fs), {}) for path in later]
    ray_internals.set_checkpoint_results(manager, kept)  # the results that exist, the newest as its latest
    ray_internals.invalidate_run_metadata(trial)  # the metadata's cached JSON would keep the lost one
    where = f"from {kept[-1].checkpoint.path}" if kept else "from the start: none of its checkpoints is left"
    return f"trial {trial.trial_id}: its latest checkpoint {lost} is not in the store; it resumes {where}"


def lost_checkpoints_callback():
    """The Tune callback that runs `recover_lost_checkpoint` over the trials of a resumed sweep, before any
    of them is restored (Tune restores a trial when its actor starts, after the first `on_step_begin`)."""
    from ray.tune import Callback

    class RecoverLostCheckpoints(Callback):
        def __init__(self):
            self.checked = False

        def on_step_begin(self, iteration, trials, **info):
            if self.checked:
                return
            self.checked = True
            for trial in trials:
                if trial.status != "TERMINATED" and (line := recover_lost_checkpoint(trial)):
                    print(f"warning: {line}", file=sys.stderr, flush=True)

    return RecoverLostCheckpoints()


# ---------------------------------------------------------------------------------------------------
# Ray

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",   # no "Loading weights" lines from every trial
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def start_ray() -> None:
    """A local cluster, or the one RAY_ADDRESS names (ray.init honours it)."""
    import logging

    import ray
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")                # CLIReporter's table, not the new console
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the metric is only in evaluation rows
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    local = not os.environ.get("RAY_ADDRESS")
    # Without the dashboard (a local run, or `ray` installed without its `default` extra) the State API is
    # down and Ray Train's placement-group cleaner warns about it every few seconds: keep workers to errors.
    worker_level = "ERROR" if local or importlib.util.find_spec("aiohttp") is None else "WARNING"
    ray.init(include_dashboard=False if local else None, logging_level=logging.WARNING,
             logging_config=ray.LoggingConfig(encoding="TEXT", log_level=worker_level),
             runtime_env={"env_vars": QUIET_ENV})


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) ends the sweep the way Ctrl+C does: Tune stops the trials,
    saves its state and the tables, and the sweep exits 130, ready for `--resume`. (Ray's own driver
    handler would exit at once, mid-write of Tune's state.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))


def default_concurrency(sweep: SweepConfig) -> int | None:
    """Ray Train trials reserve no CPU themselves (their workers do), so Tune alone would start every trial
    at once; cap them at the number of worker groups the cluster fits now."""
    if sweep.tune.max_concurrent_trials or not uses_ray_train(sweep):
        return sweep.tune.max_concurrent_trials
    import ray
    available = ray.cluster_resources()
    per_trial = {k: v * sweep.scaling.num_workers for k, v in worker_resources(sweep).items() if v}
    fits = min(int(available.get(k, 0) // v) for k, v in per_trial.items())
    return max(1, fits)


def build_tuner(raw: dict, sweep: SweepConfig, spaces: dict[str, dict], directory: str, resume: bool,
                metric_errors: list[str] | None = None):
    from ray import tune
    from ray.tune import CLIReporter
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from spo_ray import search
    from spo_ray.distributed import trainable

    trial_fn = trainable(sweep)
    cfg = sweep.tune
    space = param_space(raw, spaces)
    search_alg, num_samples, checkpoints = None, cfg.num_samples, cfg.keep_checkpoints
    if cfg.search == "optuna":
        space, num_samples = search.searcher_space(space, raw, sweep), search.total_trials(raw, sweep)
        search_alg = search.searcher(raw, sweep, spaces)
    if cfg.scheduler == "pbt":
        space, checkpoints = search.pbt_space(space, sweep, spaces), search.pbt_checkpoints_to_keep(sweep)
    if resume:  # Tune restores the searcher's state; SweepPBT reads its own back (pbt_state.yaml)
        ray_storage = storage.for_ray(directory)
        return tune.Tuner.restore(ray_storage["storage_path"], trial_fn, resume_errored=True, param_space=space,
                                  storage_filesystem=ray_storage.get("storage_filesystem"))

    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", grace_period=cfg.grace_period * sweep.train.eval_every,
                                  reduction_factor=cfg.reduction_factor, max_t=total_steps(sweep))
    elif cfg.scheduler == "pbt":
        scheduler = search.pbt_scheduler(sweep, directory)
    else:
        scheduler = FIFOScheduler()
    parameters = {key.replace(".", "/"): column_name(key) for key in [*spaces, *cfg.mutations]}
    reporter = CLIReporter(parameter_columns=parameters, metric_columns=PROGRESS_METRICS, max_report_frequency=30,
                           print_intermediate_tables=True, max_column_length=14)
    # Ray Train trials retry their workers themselves (FailureConfig in the TorchTrainer); Tune retries
    # in-process trials.
    tune_retries = 0 if uses_ray_train(sweep) else cfg.max_failures
    return tune.Tuner(
        trial_fn,
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=num_samples,
                                    search_alg=search_alg, max_concurrent_trials=default_concurrency(sweep),
                                    scheduler=scheduler, reuse_actors=cfg.reuse_actors),
        run_config=tune.RunConfig(
            **storage.for_ray(sweep.storage_path), name=sweep.name,
            failure_config=tune.FailureConfig(max_failures=tune_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints),
            callbacks=[tables_callback(directory, list(spaces)), lost_checkpoints_callback(),
                       *([metric_callback(cfg.metric, metric_errors)]
                         if metric_errors is not None and metric_is_used(cfg) else [])],
            progress_reporter=reporter, verbose=1,
        ),
    )


# ---------------------------------------------------------------------------------------------------
# The command

@user_errors_exit_2
def main(argv=None) -> int:
    args = parse_args(argv)
    raw, sweep, spaces = resolve(load_yaml(args.config), args)
    try:
        resolve_mode(sweep.wandb.mode)  # a WANDB_MODE wandb does not know: one line now, not a warning per trial
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.dry_run:
        print_trial_table(trial_table(sweep, spaces, raw), sweep)
        return EXIT_OK

    ray_internals.check()  # a Ray whose private API moved: one line now, not a failure inside Tune later
    directory = experiment_dir(sweep)
    try:  # a bucket that does not exist, refused credentials, an unreachable endpoint: one line, exit 2
        storage.check_writable(sweep.storage_path)  # first: it does not wait for a store that is down
        started = storage.exists(storage.join(directory, "tuner.pkl"))
        exists = started or storage.exists(storage.join(directory, RESULTS_FILE))
    except OSError as error:
        raise ConfigError(f"storage_path: cannot use {sweep.storage_path}: {' '.join(str(error).split())}") from None
    if args.resume and not started:
        raise ConfigError(f"--resume: {directory} holds no sweep to resume")
    if not args.resume and exists:
        raise ConfigError(f"{directory}: this experiment exists; pass --resume to continue it, or --name to "
                          f"start another")
    sampled = prepare_tasks(raw, spaces, sweep)
    storage.make_dirs(directory)
    write_sweep_file(sweep, spaces, directory)
    changed = environment.record(directory)
    if changed:
        print(f"warning: the environment changed since this sweep last ran ({'; '.join(changed)}); "
              f"{environment.ENVIRONMENT_FILE} keeps both", file=sys.stderr)

    start_ray()
    start_build_locks()
    stop_on_sigterm()
    prepare_samples(sampled, sweep)
    metric_errors: list[str] = []
    tuner = build_tuner(raw, sweep, spaces, directory, args.resume, metric_errors)
    try:
        tuner.fit()
        if metric_errors:
            raise ConfigError(f"{metric_errors[0]}; the sweep stopped at that first report ({directory} keeps "
                              f"it: pass --name to start the corrected one)")
        return summarize(directory, args, expected=len(trial_table(sweep, spaces, raw)))
    except storage.StoreUnavailable as error:
        print(f"error: the sweep stopped because the store did not answer ({error}); once it does, continue "
              f"with: {resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def resume_command(args) -> str:
    """The command that continues this sweep: the same overrides, or the resumed trials would run another
    config."""
    again = ([args.config, "--resume"] + (["--name", args.name] if args.name else [])
             + (["--storage-path", args.storage_path] if args.storage_path else [])
             + (["--set", *args.overrides] if args.overrides else []))
    return f"python -m spo_ray.sweep {shlex.join(map(str, again))}"


def summarize(directory: str, args, expected: int) -> int:
    """Print the trial counts and choose the exit code. Tune creates a trial only when it can start one (with
    `max_concurrent_trials`, after another ends), so an interrupted sweep may have grid points without a row:
    they count as unfinished, like the PENDING and PAUSED rows."""
    from spo_ray.results import read_csv
    results = read_csv(storage.join(directory, RESULTS_FILE), keep_default_na=False)
    counts = results["status"].value_counts().to_dict()
    not_started = max(0, expected - len(results))
    if not_started:
        counts["not started"] = not_started
    print(f"\n{len(results) + not_started} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"results: {storage.join(directory, RESULTS_FILE)}\nhistory: {storage.join(directory, HISTORY_FILE)}")
    unfinished = sum(counts.get(s, 0) for s in ("RUNNING", "PENDING", "PAUSED", "not started"))
    failed = counts.get("ERROR", 0) + counts.get("DIVERGED", 0)
    if unfinished:
        print(f"interrupted with {unfinished} trials unfinished; continue with: {resume_command(args)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        for row in results[results["status"].isin(["ERROR", "DIVERGED"])].to_dict("records"):
            print(f"  {row['trial_id']} {row['status']}: {row['error']}", file=sys.stderr)
        print(f"{failed} of {len(results)} trials failed", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return EXIT_OK


__all__ = ["main", "param_space", "trial_table", "ResultTables"]

if __name__ == "__main__":
    # Import through the package so that pickled objects (Tune's experiment state) name `spo_ray.sweep`.
    from spo_ray.sweep import main as package_main
    sys.exit(package_main())
