"""Read one experiment directory (written by `spo_ray.sweep`) into pandas frames.

The directory contract: `results.csv` (one row per trial: `trial_id`, `status`, `error`, one column per swept
parameter, then final metrics) and `history.parquet` (one row per reported step per trial). This module only
reads files on disk; it never imports `spo_ray`, so a finished sweep can be analysed on any machine with
pandas.

Sweeps are often read while still running or after some trials failed, so loading is forgiving: missing
history, missing columns and RUNNING/ERROR/DIVERGED rows are tolerated, and every row or file left out is
named in `Experiment.skipped` so the report can say what the tables do not cover.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

RESULTS_FILE = "results.csv"
HISTORY_FILE = "history.parquet"
CONFIG_FILE = "sweep.yaml"
ENVIRONMENT_FILE = "environment.json"  # what produced the results (spo_ray.environment): one entry per start

# Columns of results.csv that are neither swept parameters nor metrics. Metric names always contain a "/"
# (`eval/accuracy`, `train/loss`), except the bookkeeping counters below (`round`: the self-training round).
BOOKKEEPING_COLUMNS = ("trial_id", "status", "error", "step", "wall_time_s", "round")

# Only finished trials have comparable final metrics; the others are reported, not averaged.
DEFAULT_STATUSES = ("TERMINATED",)


class ExperimentError(ValueError):
    """An experiment directory whose files exist but cannot be read (empty or corrupt)."""


@dataclass
class Experiment:
    """One sweep's results, filtered to the trials the tables should use.

    `results` and `history` hold only trials whose status is in the requested statuses (TERMINATED by
    default); `all_results` keeps every row so that status counts (e.g. how often DPO diverged) stay visible.
    `history` has the swept parameters joined onto every step by `trial_id`.
    """

    path: Path
    results: pd.DataFrame
    history: pd.DataFrame
    params: list[str]
    skipped: list[str] = field(default_factory=list)
    all_results: pd.DataFrame | None = None
    environment: list[dict] = field(default_factory=list)


def is_metric_column(name: str) -> bool:
    """True for final metrics and bookkeeping columns: everything that is not a swept parameter."""
    return "/" in name or name in BOOKKEEPING_COLUMNS


def parameter_columns(results: pd.DataFrame) -> list[str]:
    """Swept parameters, inferred from the columns (sweep.yaml's `swept` key is not guaranteed)."""
    return [c for c in results.columns if not is_metric_column(c)]


def is_uri(location: str | Path) -> bool:
    """`s3://…`, `gs://…` and the other storage URIs a sweep's `storage_path` may name."""
    return "://" in str(location)


def download_experiment(uri: str, into: str | Path) -> Path:
    """Copy the files this package reads (results.csv, history.parquet, sweep.yaml, environment.json) from an
    experiment at a
    storage URI (any filesystem `pyarrow.fs` knows; credentials and endpoint from the environment, as for
    the sweep) into `into/<experiment name>`, and return that folder."""
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    base = base.rstrip("/")
    if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"experiment directory not found: {uri}")
    local = Path(into) / base.rsplit("/", 1)[-1]
    local.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_FILE, HISTORY_FILE, CONFIG_FILE, ENVIRONMENT_FILE):
        if fs.get_file_info(f"{base}/{name}").type == pyarrow.fs.FileType.File:
            pyarrow.fs.copy_files(f"{base}/{name}", str(local / name), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def load_experiment(directory: str | Path, statuses: tuple[str, ...] = DEFAULT_STATUSES) -> Experiment:
    """Load `results.csv` and (when present) `history.parquet` from an experiment directory, a local folder
    or a storage URI (read through a local copy of its files: `Experiment.path` is then that copy).

    Raises FileNotFoundError naming the directory or `results.csv` when they are missing, and
    ExperimentError when a file cannot be parsed.
    """
    if is_uri(directory):
        scratch = tempfile.mkdtemp(prefix="spo-ray-experiment-")
        atexit.register(shutil.rmtree, scratch, True)
        directory = download_experiment(str(directory), scratch)
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"experiment directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"experiment path is not a directory: {path}")
    all_results = read_results(path / RESULTS_FILE)
    params = parameter_columns(all_results)
    skipped: list[str] = []

    results = _keep_statuses(all_results, statuses, skipped)
    history = _read_history(path / HISTORY_FILE, skipped)
    history = join_params(history, results, params, skipped)
    return Experiment(path, results, history, params, skipped, all_results, read_environment(path, skipped))


def read_environment(path: Path, skipped: list[str]) -> list[dict]:
    """The entries of environment.json (none where it is missing; a note where it cannot be read)."""
    try:
        return json.loads((path / ENVIRONMENT_FILE).read_text()) if (path / ENVIRONMENT_FILE).exists() else []
    except (OSError, ValueError) as error:
        skipped.append(f"{ENVIRONMENT_FILE} could not be read ({error}): the environment is not shown")
        return []


def read_results(results_path: Path) -> pd.DataFrame:
    """Parse results.csv with stable dtypes: `trial_id` and `error` as strings, missing status as TERMINATED."""
    if not results_path.is_file():
        raise FileNotFoundError(f"results file not found: {results_path}")
    try:
        results = pd.read_csv(results_path, dtype={"trial_id": str, "error": str, "status": str})
    except pd.errors.EmptyDataError:
        raise ExperimentError(f"results file is empty: {results_path}") from None
    if "trial_id" not in results.columns:
        # Without ids the rows cannot be joined to history; number them so tables still work.
        results.insert(0, "trial_id", [str(i) for i in range(len(results))])
    if "status" not in results.columns:
        results["status"] = "TERMINATED"
    if "error" not in results.columns:
        results["error"] = ""
    results["status"] = results["status"].fillna("UNKNOWN").astype(str)
    results["error"] = results["error"].fillna("").astype(str)
    return results


def _keep_statuses(results: pd.DataFrame, statuses: tuple[str, ...], skipped: list[str]) -> pd.DataFrame:
    """Filter rows by status and note, per status, how many trials were left out."""
    keep = results["status"].isin(statuses)
    for status, count in sorted(Counter(results.loc[~keep, "status"]).items()):
        noun = "trial" if count == 1 else "trials"
        skipped.append(f"skipped {count} {noun} with status {status}")
    return results.loc[keep].reset_index(drop=True)


def _read_history(history_path: Path, skipped: list[str]) -> pd.DataFrame:
    """Read history.parquet, or an empty frame with a note when the sweep has not written it (yet)."""
    if not history_path.is_file():
        skipped.append(f"no {HISTORY_FILE}: training-curve plots are left out")
        return pd.DataFrame(columns=["trial_id", "step"])
    try:
        history = pd.read_parquet(history_path)
    except Exception as error:  # pyarrow raises several types for a truncated or foreign file
        raise ExperimentError(f"cannot read {history_path}: {error}") from None
    if "trial_id" not in history.columns or "step" not in history.columns:
        skipped.append(f"{HISTORY_FILE} has no trial_id/step columns: training-curve plots are left out")
        return pd.DataFrame(columns=["trial_id", "step"])
    history["trial_id"] = history["trial_id"].astype(str)
    return history


def join_params(
    history: pd.DataFrame, results: pd.DataFrame, params: list[str], skipped: list[str]
) -> pd.DataFrame:
    """Attach each trial's parameters to its steps, keeping only the trials kept in `results`.

    Parameter columns already in history are replaced by those of results.csv, the single source of truth.
    """
    if history.empty:
        return history.reindex(columns=list(history.columns) + [p for p in params if p not in history])
    own_columns = [c for c in history.columns if c not in params]
    joined = history[own_columns].merge(results[["trial_id", *params]], on="trial_id", how="inner")
    dropped = set(history["trial_id"]) - set(joined["trial_id"])
    if dropped:
        noun = "trial" if len(dropped) == 1 else "trials"
        skipped.append(f"history of {len(dropped)} {noun} not used (not finished or not in {RESULTS_FILE})")
    return joined.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)
