"""Grid, random, TPE and PBT over λ, β and the learning rate, on the same budget (docs/results.md, "Searching
λ, β and the learning rate").

    .venv/bin/python scripts/search_compare.py [--store results] [--figures docs/img/search]

1. runs sweeps/search_{grid,random,tpe,pbt}.yaml (24 trials × 100 steps each; an experiment that exists is
   resumed, a finished one kept) and times each run;
2. takes each search's best: the grid's, random's and TPE's configuration with the best mean over its two
   seeds; PBT's best trial's path (its lineage, as a `schedule:`) and, where that path changed values,
   its first and its last values held constant from step 0; when the best trial kept its values, the
   same for the best trial whose path did change (`pbt_schedule`);
3. re-runs each with four fresh seeds (sweeps/search_rerun.yaml, seeds 100–103);
4. prints a Markdown table (search, best found in the search, re-run mean ± std, values, wall times), writes
   results/search_compare.json, and draws best found against steps spent (`--figures`/best_so_far.png)
   and PBT's lineage (`--figures`/pbt_lineage.png).

Wall times are each `python -m spo_ray.sweep` run's, Ray's start included; runs that were only read back
(already finished) have none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis import plots, search  # noqa: E402
from analysis.collect import load_experiment  # noqa: E402
from analysis.tables import to_markdown  # noqa: E402

METRIC = "eval/mass_correct"
SEARCHES = ("grid", "random", "tpe", "pbt")
KEYS = {"spo_lambda": "loss.spo_lambda", "beta": "loss.beta", "learning_rate": "train.learning_rate"}


def run_sweep(store: Path, name: str, sweep: str, overrides: list[str], times: dict) -> None:
    """Run (or resume) one sweep unless it finished; record its wall time."""
    directory = store / name
    if (directory / "results.csv").exists():
        results = pd.read_csv(directory / "results.csv", keep_default_na=False)
        if len(results) and set(results["status"]) <= {"TERMINATED", "DIVERGED"}:
            return
    resume = ["--resume"] if (directory / "tuner.pkl").exists() else []
    command = [sys.executable, "-m", "spo_ray.sweep", sweep, "--storage-path", str(store), "--name", name,
               *resume]
    if overrides:
        command += ["--set", *overrides]
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    times[name] = round(time.perf_counter() - start, 1)
    print(f"{name}: {times[name]} s, exit {code}", flush=True)
    if code not in (0, 1):
        sys.exit(f"{name} stopped with exit code {code}")


def values_override(values: dict) -> list[str]:
    return [f"{KEYS[column]}={float(value)!r}" for column, value in values.items()]


def best_constant(store: Path, name: str) -> tuple[dict, float, int]:
    """A searcher's best configuration: its values, its mean over seeds, the steps its search spent."""
    configurations = search.configurations(load_experiment(store / name).results, METRIC)
    best = configurations.loc[configurations["score"].idxmax()]
    return ({column: best[column] for column in KEYS}, float(best["score"]),
            int(configurations["steps_so_far"].iloc[-1]))


def best_path(store: Path) -> tuple[pd.DataFrame, float, int, pd.DataFrame]:
    """PBT's best trial: its schedule, its final metric, the population's steps, the population's curve."""
    exp = load_experiment(store / "search_pbt")
    trial = search.best_trial(exp.results, METRIC)
    table = search.schedule(exp.history, trial)
    score = float(exp.results.set_index("trial_id").loc[trial, METRIC])
    return table, score, int(exp.results["step"].sum()), search.population_best(exp.history, METRIC)


def best_schedule(store: Path) -> tuple[str, pd.DataFrame, float] | None:
    """PBT's best trial among those whose path changed values on the way (an exploit in its lineage)."""
    exp = load_experiment(store / "search_pbt")
    for trial in exp.results.sort_values(METRIC, ascending=False)["trial_id"]:
        table = search.schedule(exp.history, trial)
        if len(table) > 1:
            return trial, table, float(exp.results.set_index("trial_id").loc[trial, METRIC])
    return None


def path_reruns(name: str, table: pd.DataFrame, score: float, spent: int) -> dict[str, dict]:
    """A PBT path re-run as its `schedule:`, and (when it changed values) its first and its last values
    held constant from step 0: does the change over training matter, or only where it ended?"""
    schedule = search.schedule_yaml(table, list(KEYS.values()))
    first, last = ({c: row[c] for c in KEYS} for row in (table.iloc[0], table.iloc[-1]))
    entries = {name: {"values": first, "search_score": score, "steps": spent, "schedule": schedule,
                      "segments": table.to_dict("records"),
                      "overrides": values_override(first) + [f"schedule={json.dumps(schedule)}"]}}
    if len(table) > 1:
        for which, values in (("first", first), ("last", last)):
            entries[f"{name}_{which}_constant"] = {"values": values, "search_score": None, "steps": spent,
                                                   "overrides": values_override(values)}
    return entries
def rerun_score(store: Path, name: str) -> tuple[float, float, int]:
    results = load_experiment(store / name).results
    return float(results[METRIC].mean()), float(results[METRIC].std()), len(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results", help="where the experiments go (storage_path)")
    parser.add_argument("--figures", default="docs/img/search", help="where the two figures go")
    args = parser.parse_args(argv)
    store, figures = (ROOT / args.store).resolve(), ROOT / args.figures
    times_file = store / "search_compare_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}

    for name in SEARCHES:
        run_sweep(store, f"search_{name}", f"sweeps/search_{name}.yaml", [], times)
        times_file.write_text(json.dumps(times, indent=2))

    found, curves = {}, {}
    for name in ("grid", "random", "tpe"):
        values, score, spent = best_constant(store, f"search_{name}")
        found[name] = {"values": values, "search_score": score, "steps": spent,
                       "overrides": values_override(values)}
        curves[name] = search.configurations(load_experiment(store / f"search_{name}").results, METRIC)
    table, score, spent, population = best_path(store)
    found.update(path_reruns("pbt", table, score, spent))
    scheduled = best_schedule(store)
    if scheduled is not None and len(table) == 1:  # the best trial kept its values: take the best whose path changed
        trial, scheduled_table, scheduled_score = scheduled
        found.update(path_reruns("pbt_schedule", scheduled_table, scheduled_score, spent))
    curves["pbt"] = population.rename(columns={"best": "best_so_far"})

    reruns = {}
    for name, best in found.items():
        run_sweep(store, f"rerun_{name}", "sweeps/search_rerun.yaml", best["overrides"], times)
        times_file.write_text(json.dumps(times, indent=2))
        mean, std, n = rerun_score(store, f"rerun_{name}")
        best.update(rerun_mean=mean, rerun_std=std, rerun_n=n)
        if name in curves:
            reruns[name] = (best["steps"], mean, std)

    figures.mkdir(parents=True, exist_ok=True)
    plots.plot_best_so_far(curves, figures / "best_so_far.png", METRIC, reruns)
    exp = load_experiment(store / "search_pbt")
    final = dict(zip(exp.results["trial_id"], exp.results[METRIC]))
    drawn, label = (table, "best trial's path") if len(table) > 1 or scheduled is None else (
        scheduled[1], f"path of {scheduled[0]}, the best trial whose values changed")
    plots.plot_pbt_lineage(exp.history, final, figures / "pbt_lineage.png", METRIC, drawn, label)
    summary = json.dumps({"found": found, "times": times}, indent=2, default=float)
    (store / "search_compare.json").write_text(summary)

    print(f"\n| search | best in the search (mean over its seeds) | re-run, seeds 100–103 (mean ± std) | "
          f"λ | β | learning rate | search wall time | re-run wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, best in found.items():
        v = best["values"]
        in_search = "–" if best["search_score"] is None else f"{best['search_score']:.3f}"
        walls = [times.get(f"search_{name}"), times.get(f"rerun_{name}")]
        rerun = f"{best['rerun_mean']:.3f} ± {best['rerun_std']:.3f} (n={best['rerun_n']})"
        print(f"| {name} | {in_search} | {rerun} | "
              f"{v['spo_lambda']:.3g} | {v['beta']:.3g} | {v['learning_rate']:.3g} | "
              + " | ".join("–" if wall is None else f"{wall:.0f} s" for wall in walls) + " |")
    for name in ("pbt", "pbt_schedule"):
        if name in found:
            print(f"\n{name}: the path\n")
            print(to_markdown(pd.DataFrame(found[name]["segments"]), decimals=4))
            print("\nschedule:", yaml.safe_dump(found[name]["schedule"], default_flow_style=True).strip())
    print("\nwall times:", json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
