"""Searchers and PBT, read from an experiment's files: best-so-far curves, lineages, schedules.

- A searcher's trials (Optuna's, or any sweep's) form configurations: trials that share every parameter
  but the seed. `configurations` scores each by its mean over seeds, in the order its first trial was made
  (results.csv keeps rows in that order), with the best found so far against trials and training steps.
- A PBT trial's history carries the values it trained with (`hp/<column>`, e.g. hp/spo_lambda) and, on its
  first row after an exploit, the trial whose checkpoint it took and that checkpoint's step (`exploit/donor`,
  `exploit/step`). `lineage` follows those back from a trial's end: the segments of training that produced
  its final weights. `schedule` is that path as a table, and `schedule_yaml` as a `schedule:` section that
  re-runs it (spo_ray's RunConfig.schedule).
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import parameter_columns

HP_PREFIX = "hp/"
DONOR, DONOR_STEP = "exploit/donor", "exploit/step"


def hp_columns(history: pd.DataFrame) -> list[str]:
    return [c for c in history.columns if c.startswith(HP_PREFIX)]


def is_population(history: pd.DataFrame) -> bool:
    """A PBT experiment: its trials logged the values they trained with."""
    return bool(hp_columns(history))


# ---------------------------------------------------------------------------------------------------
# Searchers: best so far

def configurations(results: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """One row per configuration in the order its first trial was made: its parameters, `trials`, `steps`
    (its trials' steps added up), `score` (the mean of `metric` over its trials: over seeds), and
    `trials_so_far`, `steps_so_far`, `best_so_far` (the best score among it and those before it)."""
    columns = [c for c in parameter_columns(results) if c != "seed"]
    if results.empty or metric not in results.columns:
        return pd.DataFrame(columns=[*columns, "trials", "steps", "score", "trials_so_far", "steps_so_far",
                                     "best_so_far"])
    rows = results.assign(_order=range(len(results)))
    groups = rows.groupby(columns, sort=False, dropna=False) if columns else [((), rows)]
    table = []
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        table.append({**dict(zip(columns, values)), "trials": len(group),
                      "steps": float(group["step"].sum()) if "step" in group else math.nan,
                      "score": group[metric].mean(), "_order": group["_order"].min()})
    frame = pd.DataFrame(table).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame["trials_so_far"] = frame["trials"].cumsum()
    frame["steps_so_far"] = frame["steps"].cumsum()
    frame["best_so_far"] = frame["score"].cummax() if higher_is_better else frame["score"].cummin()
    return frame


def population_best(history: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """PBT's counterpart of best-so-far: at each step the metric was measured, the best trial's value then
    and the training steps the population had spent by that step."""
    if metric not in history.columns:
        return pd.DataFrame(columns=["step", "best", "steps_so_far"])
    measured = history.dropna(subset=[metric])
    final_step = history.groupby("trial_id")["step"].max()
    table = []
    for step, rows in measured.groupby("step", sort=True):
        best = rows[metric].max() if higher_is_better else rows[metric].min()
        table.append({"step": step, "best": best, "steps_so_far": float(final_step.clip(upper=step).sum())})
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------------------------------
# PBT: lineage and schedule

def lineage(history: pd.DataFrame, trial_id: str) -> list[tuple[str, int, int]]:
    """The (trial, from step, to step) segments of training behind `trial_id`'s final weights, oldest first:
    the trial's own steps back to its last exploit, then its donor's before that, and so on."""
    segments = []
    current = str(trial_id)
    end = int(history.loc[history["trial_id"] == current, "step"].max())
    while True:
        rows = history[(history["trial_id"] == current) & (history["step"] <= end)]
        taken = rows.dropna(subset=[DONOR_STEP]) if DONOR_STEP in rows else rows.iloc[:0]
        taken = taken[taken[DONOR_STEP] < end]
        if taken.empty:
            segments.append((current, 0, end))
            return segments[::-1]
        last = taken.sort_values("step").iloc[-1]
        start = int(last[DONOR_STEP])
        segments.append((current, start, end))
        current, end = str(last[DONOR]), start


def schedule(history: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    """`trial_id`'s path as a table: one row per lineage segment (from step, to step, the trial that trained
    it, the hp/* values in force), consecutive segments with the same values merged."""
    values = hp_columns(history)
    table = []
    for owner, start, end in lineage(history, trial_id):
        rows = history[(history["trial_id"] == owner) & (history["step"] > start) & (history["step"] <= end)]
        first = rows.sort_values("step").iloc[0]
        row = {"from_step": start, "to_step": end, "trial_id": owner,
               **{c.removeprefix(HP_PREFIX): first[c] for c in values}}
        names = [c.removeprefix(HP_PREFIX) for c in values]
        if table and all(table[-1][name] == row[name] for name in names):
            table[-1]["to_step"] = end
            table[-1]["trial_id"] = f"{table[-1]['trial_id']}, {owner}"
        else:
            table.append(row)
    return pd.DataFrame(table)


def schedule_yaml(table: pd.DataFrame, keys: list[str]) -> dict[str, list[list]]:
    """A `schedule:` section that re-runs the path in `table` (from `schedule`): {dotted key: [[step, value],
    ...]} for each key in `keys` (the sweep's tune.mutations) whose column the table has."""
    section = {}
    for key in keys:
        column = key.rsplit(".", 1)[-1]
        if column in table.columns:
            section[key] = [[int(step), float(value)] for step, value in zip(table["from_step"], table[column])]
    return section


def best_trial(results: pd.DataFrame, metric: str, higher_is_better: bool = True) -> str | None:
    finished = results.dropna(subset=[metric]) if metric in results.columns else results.iloc[:0]
    if finished.empty:
        return None
    index = finished[metric].idxmax() if higher_is_better else finished[metric].idxmin()
    return str(finished.loc[index, "trial_id"])
