"""Turn one experiment directory into `report.md`, `tables/*.{md,tex,csv}` and `plots/*.png`.

    python -m analysis.report EXPERIMENT_DIR [--metric METRIC [--mode max|min]] [--decimals 3] [--out DIR] [--wandb [MODE]]

The main metric (the one tables rank by and figures plot and colour by) is the sweep's own `tune.metric` and
`tune.mode`, read from sweep.yaml, unless `--metric` names another; eval/accuracy (higher is better) where
sweep.yaml has none. The report's first line says which it used and why.

Everything is written into the experiment directory (or `--out`), with links in report.md relative to it,
so the directory can be zipped or pushed to a repository and still render. EXPERIMENT_DIR may be a storage
URI (`s3://bucket/results/beta`): the report is then uploaded next to the tables, unless `--out` names a
local folder for it. `--wandb` also logs the tables and plots to W&B as a run in the sweep's group
(analysis.dashboard; offline unless a W&B key is configured, like the trials).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import plots, search
from analysis.collect import CONFIG_FILE, Experiment, ExperimentError, is_uri, load_experiment
from analysis.tables import (before_after, best_configs, config_columns, paired_differences, per_round,
                             round_differences, round_ends, start_and_end, summary_table, to_markdown, write_table)

REPORT_FILE = "report.md"
LOGP_METRICS = ("eval/chosen_logp_delta", "eval/rejected_logp_delta")
# What each figure needs, said in the report when a sweep is too small to draw it.
PLOTS = {
    "logp_evolution": ("Log-prob evolution of chosen and rejected responses", "history with log-prob deltas"),
    "accuracy_vs_beta": ("Metric vs β", "at least two values of β"),
    "beta_lambda_heatmap": ("SPO β × λ grid", "SPO runs with at least two β and two λ"),
    "init_sensitivity": ("Initialization sensitivity", "at least two initializations"),
    "mass_split": ("Where the probability mass goes", "eval/mass_* metrics"),
    "rounds": ("Self-training rounds", "a sweep with data.sampled_pairs.rounds > 1 and step-0 evaluations"),
    # only in reports of searcher and PBT sweeps:
    "best_so_far": ("Best configuration so far (mean over seeds)", "finished trials with the metric"),
    "pbt_lineage": ("PBT lineage: mutated values over training, coloured by the final metric (× an exploit)",
                    "history with hp/* columns"),
}


def tune_settings(exp: Experiment) -> dict:
    """The sweep's `tune` section from sweep.yaml (empty when the file or section is missing)."""
    import yaml

    path = exp.path / CONFIG_FILE
    try:
        tune = (yaml.safe_load(path.read_text()) or {}).get("tune") if path.is_file() else None
    except (yaml.YAMLError, AttributeError):
        tune = None
    return tune if isinstance(tune, dict) else {}


DEFAULT_METRIC, DEFAULT_MODE = "eval/accuracy", "max"


@dataclass(frozen=True)
class MainMetric:
    """What the report ranks and colours by, and why that one (said in the report's first lines)."""
    name: str
    higher_is_better: bool
    source: str

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"


def main_metric(exp: Experiment, metric: str | None = None, mode: str | None = None) -> MainMetric:
    """The sweep's own `tune.metric` and `tune.mode` (sweep.yaml) unless `metric` names another; eval/accuracy
    (max) where sweep.yaml has none. A metric other than the sweep's is minimized when `mode` says so, or when
    its name ends in "loss"."""
    tune = tune_settings(exp)
    swept_metric, swept_mode = tune.get("metric"), tune.get("mode")
    if metric is None or metric == swept_metric:
        if isinstance(swept_metric, str) and swept_metric:
            chosen = mode or (swept_mode if swept_mode in ("max", "min") else DEFAULT_MODE)
            source = "the sweep's tune.metric" if metric is None else "--metric, also the sweep's tune.metric"
            return MainMetric(swept_metric, chosen == "max", source)
        if metric is None:
            return MainMetric(DEFAULT_METRIC, (mode or DEFAULT_MODE) == "max",
                              "the default: sweep.yaml names no tune.metric")
    chosen = mode or ("min" if metric.endswith("loss") else "max")
    return MainMetric(metric, chosen == "max", "--metric")


def check_metric_name(exp: Experiment, metric: str) -> None:
    """`--metric` must name a metric the experiment's trials reported (a column of results.csv or
    history.parquet); nothing to check before any trial has reported one."""
    import difflib

    frames = [frame for frame in (exp.all_results, exp.results, exp.history) if frame is not None]
    reported = sorted({column for frame in frames for column in frame.columns if "/" in column})
    if reported and metric not in reported:
        close = difflib.get_close_matches(metric, reported, n=3, cutoff=0.6)
        hint = ("did you mean " + " or ".join(f"'{name}'" for name in close) + "?" if close
                else "it reports " + ", ".join(reported[:12]) + (", …" if len(reported) > 12 else ""))
        raise ExperimentError(f"--metric: '{metric}' is not a metric of {exp.path} ({hint})")


def report_configs(results: pd.DataFrame) -> list[str]:
    """The configuration columns worth a table column: the loss plus every parameter that varies."""
    varying = [c for c in config_columns(results) if results[c].nunique(dropna=False) > 1]
    return (["loss"] if "loss" in results.columns and "loss" not in varying else []) + varying


def build_tables(exp: Experiment, metric: str, higher_is_better: bool | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report, by file stem; empty frames for the ones the sweep cannot fill. Best values
    are the highest unless `higher_is_better` is False (None: lowest only for a metric named *loss)."""
    results = exp.results
    by = report_configs(results)
    tables = {"summary": summary_table(results, [metric, *[m for m in LOGP_METRICS if m != metric]], by=by)}
    mass = [c for c in plots.MASS_COLUMNS if c in results.columns]
    if mass:
        tables["mass"] = summary_table(results, mass, by=by)
    lower_is_better = metric.endswith("loss") if higher_is_better is None else not higher_is_better
    tables["best_configs"] = best_configs(results, metric, config=by, higher_is_better=not lower_is_better)
    tables["paired_spo_dpo"] = paired_differences(results, metric)
    tables["before_after"] = before_after(results, exp.history, metric, by=by)
    if exp.all_results is not None and "loss" in exp.all_results.columns:
        counts = pd.crosstab(exp.all_results["loss"], exp.all_results["status"])
        tables["status_counts"] = counts.reset_index().rename_axis(columns=None)
    ends = round_ends(results, exp.history, metric)
    if not ends.empty:
        tables["per_round"] = per_round(ends, metric, by=by)
        if {"spo", "dpo"} <= set(ends.get("loss", [])):
            tables["rounds_spo_dpo"] = round_differences(ends, "spo", "dpo", metric)
    if tune_settings(exp).get("search") == "optuna":
        tables["best_so_far"] = search.configurations(results, metric, not lower_is_better)
    best = search.best_trial(results, metric, not lower_is_better)
    if search.is_population(exp.history) and best is not None:
        tables["pbt_schedule"] = search.schedule(exp.history, best)
    return tables


def initial_values(exp: Experiment, metric: str) -> dict[str, float]:
    """The metric of each init at step 0 (`train.eval_on_start`), averaged over the runs that start there."""
    starts = start_and_end(exp.results, exp.history, metric, items=None)
    if starts.empty:
        return {}
    if "init" not in starts.columns:
        return {"init": float(starts["before"].mean())}
    return {str(init): float(before) for init, before in starts.groupby("init")["before"].mean().items()}


def initial_mass(exp: Experiment) -> pd.DataFrame:
    """Each init's mean eval/mass_* at step 0 (rows: inits; empty without step-0 evaluations), the mass
    split's reference bars."""
    values = {column: initial_values(exp, column) for column in plots.MASS_COLUMNS}
    return pd.DataFrame({column: by_init for column, by_init in values.items() if by_init})


def draw_plots(exp: Experiment, plot_dir: Path, metric: str,
               higher_is_better: bool | None = None) -> dict[str, Path | None]:
    """Every figure by name; None where the sweep lacks what the figure needs."""
    return {
        "logp_evolution": plots.plot_logp_evolution(exp.history, plot_dir / "logp_evolution.png"),
        "accuracy_vs_beta": plots.plot_accuracy_vs_beta(exp.results, plot_dir / "accuracy_vs_beta.png", metric,
                                                        initial_values(exp, metric)),
        "beta_lambda_heatmap": plots.plot_beta_lambda_heatmap(
            exp.results, plot_dir / "beta_lambda_heatmap.png", metric
        ),
        "init_sensitivity": plots.plot_init_sensitivity(exp.results, plot_dir / "init_sensitivity.png", metric),
        "mass_split": plots.plot_mass_split(exp.results, plot_dir / "mass_split.png", initial_mass(exp)),
        "rounds": plots.plot_rounds(per_round(round_ends(exp.results, exp.history, metric), metric,
                                              by=report_configs(exp.results)), plot_dir / "rounds.png", metric),
        **search_plots(exp, plot_dir, metric, higher_is_better),
    }


def search_plots(exp: Experiment, plot_dir: Path, metric: str,
                 higher_is_better: bool | None = None) -> dict[str, Path | None]:
    """A searcher's best-so-far curves; a PBT population's lineage with the best trial's path."""
    higher = not metric.endswith("loss") if higher_is_better is None else higher_is_better
    figures = {}
    if tune_settings(exp).get("search") == "optuna":
        curve = search.configurations(exp.results, metric, higher)
        figures["best_so_far"] = plots.plot_best_so_far({exp.path.name: curve}, plot_dir / "best_so_far.png", metric)
    if search.is_population(exp.history):
        best = search.best_trial(exp.results, metric, higher)
        final = dict(zip(exp.results["trial_id"], exp.results[metric])) if metric in exp.results else {}
        path = search.schedule(exp.history, best) if best is not None else None
        figures["pbt_lineage"] = plots.plot_pbt_lineage(exp.history, final, plot_dir / "pbt_lineage.png", metric,
                                                        path)
    return figures


def write_report(directory: str | Path, metric: str | None = None, decimals: int = 3,
                 out: str | Path | None = None, wandb_mode: str | None = None, mode: str | None = None) -> Path | str:
    """Write report.md, tables/ and plots/ into `out` (default: the experiment directory; for a storage URI,
    uploaded into it); return where report.md is. `metric` and `mode` default to the sweep's `tune.metric` and
    `tune.mode` (main_metric). With `wandb_mode` ("" for sweep.yaml's `wandb.mode`), also log the tables and
    plots to W&B as a run in the sweep's group (analysis.dashboard)."""
    exp = load_experiment(directory)
    main = main_metric(exp, metric, mode)
    if main.source == "--metric":
        check_metric_name(exp, main.name)
    metric = main.name
    root = Path(out) if out is not None else exp.path  # exp.path: a URI's local copy
    tables = build_tables(exp, metric, main.higher_is_better)
    for stem, table in tables.items():
        write_table(table, root / "tables" / stem, decimals)
    figures = draw_plots(exp, root / "plots", metric, main.higher_is_better)
    report = root / REPORT_FILE
    report.write_text(render_markdown(exp, tables, figures, metric, decimals, root, main), encoding="utf-8")
    if wandb_mode is not None:
        from analysis.dashboard import log_report
        log_report(exp, tables, figures, metric, {name: title for name, (title, _) in PLOTS.items()}, root,
                   wandb_mode or None)
    if out is None and is_uri(directory):
        upload_report(root, str(directory))
        base, _, query = str(directory).partition("?")
        return f"{base.rstrip('/')}/{REPORT_FILE}" + (f"?{query}" if query else "")
    return report


def upload_report(root: Path, uri: str) -> None:
    """report.md, tables/ and plots/ into the experiment at `uri`, beside the tables they were made from."""
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    local = pyarrow.fs.LocalFileSystem()
    for name in (REPORT_FILE, "tables", "plots", "wandb"):  # wandb/: the report's own W&B run, if it logged one
        if (root / name).exists():
            pyarrow.fs.copy_files(str(root / name), f"{base.rstrip('/')}/{name}", source_filesystem=local,
                                  destination_filesystem=fs)


def render_markdown(
    exp: Experiment, tables: dict[str, pd.DataFrame], figures: dict[str, Path | None], metric: str, decimals: int,
    root: Path | None = None, main: MainMetric | None = None,
) -> str:
    """The report's text: what was used, the tables inline, the figures linked relatively."""
    used, total = len(exp.results), len(exp.all_results) if exp.all_results is not None else len(exp.results)
    why = f" ({main.source}; {'higher' if main.higher_is_better else 'lower'} is better)" if main else ""
    lines = [f"# Experiment report: {exp.path.name}", "",
             f"Main metric: `{metric}`{why}. Trials used: {used} of {total}."]
    lines += [f"- {note}" for note in exp.skipped]
    if metric not in exp.results.columns:
        lines.append(f"- results.csv has no column `{metric}`: its tables are empty")

    def section(title: str, stem: str, empty: str, intro: str = "") -> None:
        lines.extend(["", f"## {title}", ""])
        if intro:
            lines.extend([intro, ""])
        table = tables.get(stem)
        if table is None or table.empty:
            lines.append(empty)
        else:
            lines.append(to_markdown(table, decimals).rstrip("\n"))
        lines.extend(["", f"Files: `tables/{stem}.md`, `tables/{stem}.tex`, `tables/{stem}.csv`."])

    section("Summary (mean ± std over seeds)", "summary", "No finished trials to summarize.")
    if "mass" in tables:
        section("Probability mass split (mean ± std over seeds)", "mass", "No mass metrics.")
    section("Best configuration per loss", "best_configs", f"No finished trials with `{metric}`.",
            "Ranked by the mean over seeds, not the best single run.")  # fmt: skip
    section("Paired SPO − DPO differences", "paired_spo_dpo", "No SPO and DPO runs sharing β, init and seed.",
            f"`{metric}` of SPO minus DPO on runs matched by β, init and seed; 95% percentile-bootstrap interval "
            "(10 000 resamples, seed 0). Rows with β = all pool every pair.")  # fmt: skip
    section("Before and after training", "before_after", f"No runs with `{metric}` at step 0 (train.eval_on_start).",
            f"`{metric}` of the initial weights (step 0) and at the end, per configuration; the change's 95% "
            "bootstrap interval resamples seeds and, where each question's outcome was logged "
            "(`eval/answers_correct`), the questions too, pairing every question with itself.")  # fmt: skip
    if "per_round" in tables:
        section("Per round (self-training)", "per_round", "No rounds.",
                f"`{metric}` at step 0 (round 0) and at each round's end; `change` since round 0 with its 95% "
                "bootstrap interval over seeds and questions. `chosen Δ` / `rejected Δ`: the held-out pairs' "
                "log-prob change against the round's reference (the round's start under reference_update: "
                "previous); `chosen from init`: since step 0. `samples right`, `prompts with a pair`, `pairs`: the "
                "round's own table, sampled from the policy that started the round.")
    if "rounds_spo_dpo" in tables:
        section("Per round: SPO − DPO", "rounds_spo_dpo", "No SPO and DPO runs sharing a seed.",
                f"`{metric}` of SPO minus DPO on the same seeds and questions at each round's end; 95% "
                "bootstrap interval over seeds and questions.")
    if "status_counts" in tables:
        section("Trial status by loss (all trials)", "status_counts", "No trials.")
    if "best_so_far" in tables:
        section("Searcher: best so far", "best_so_far", f"No finished trials with `{metric}`.",
                f"Configurations in the order the searcher suggested them, each scored by the mean `{metric}` "
                "over its seeds; `best_so_far` against the trials and training steps spent up to it.")
    if "pbt_schedule" in tables:
        section("PBT: the best trial's schedule", "pbt_schedule", "No lineage.",
                "The values the best trial's final weights were trained with, step range by step range, and "
                "the trial that trained each range (an exploit hands over a checkpoint: the ranges before it "
                "were the donor's). As a `schedule:` section it re-runs this path with other seeds.")
        keys = list(tune_settings(exp).get("mutations") or {})
        if keys and not tables["pbt_schedule"].empty:
            import json  # a JSON list is a YAML flow sequence: one line per key

            section = search.schedule_yaml(tables["pbt_schedule"], keys)
            lines.extend(["", "```yaml", "schedule:", *(f"  {k}: {json.dumps(v)}" for k, v in section.items()), "```"])

    lines.extend(environment_lines(exp.environment))
    lines.extend(["", "## Figures", ""])
    for name, path in figures.items():
        title, needs = PLOTS[name]
        if path is None:
            lines.append(f"- {title}: not drawn (needs {needs}).")
        else:
            lines.extend([f"### {title}", "", f"![{title}]({path.relative_to(root or exp.path).as_posix()})", ""])
    return "\n".join(lines).rstrip("\n") + "\n"


ENVIRONMENT_KEYS = (("python", "Python"), ("torch", "torch"), ("ray", "Ray"), ("transformers", "transformers"),
                    ("trl", "TRL"), ("peft", "peft"), ("pydantic", "pydantic"), ("vllm", "vLLM"), ("cpu", "CPU"),
                    ("gpus", "GPUs"), ("platform", "platform"))


def environment_lines(entries: list[dict]) -> list[str]:
    """The report's Environment section: the last start's versions, machine and commit, and what differed at
    earlier starts of the same experiment (a sweep resumed under other versions)."""
    lines = ["", "## Environment", ""]
    if not entries:
        return lines + ["Not recorded (environment.json is missing: a sweep started before spo-ray recorded it)."]
    last = entries[-1]
    commit = last.get("commit")
    state = "" if commit is None else " (with uncommitted changes)" if last.get("dirty") else ""
    lines.append(f"Last started {last.get('started', '?')} at commit `{commit or 'unknown'}`{state}.")
    lines.append("")
    lines.append("| | |")
    lines.append("| --- | --- |")
    for key, name in ENVIRONMENT_KEYS:
        value = last.get(key)
        if value not in (None, [], ""):
            lines.append(f"| {name} | {', '.join(value) if isinstance(value, list) else value} |")
    for earlier in entries[:-1]:
        differ = [f"{key} {earlier.get(key)}" for key in ("commit", *(k for k, _ in ENVIRONMENT_KEYS))
                  if earlier.get(key) != last.get(key)]
        if differ:
            lines.append("")
            lines.append(f"- Started before on {earlier.get('started', '?')} with " + "; ".join(differ) + ".")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (also read by the CLI reference, scripts/reference_docs.py)."""
    from spo_ray.tracking import MODES as WANDB_MODES  # the trials' modes (a module of the standard library alone)

    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("experiment_dir", help="directory or storage URI holding results.csv (and history.parquet)")
    parser.add_argument("--out", help="write the report into this local folder instead of the experiment's")
    parser.add_argument("--metric", help="metric for the tables and plots (default: the sweep's tune.metric, "
                                         "else eval/accuracy)")
    parser.add_argument("--mode", choices=["max", "min"], help="whether higher or lower --metric is better "
                                                               "(default: the sweep's tune.mode for its own metric)")
    parser.add_argument("--decimals", type=int, default=3, help="decimals in Markdown/LaTeX cells")
    parser.add_argument("--wandb", nargs="?", const="", metavar="MODE", choices=["", *WANDB_MODES],
                        help="also log the tables and plots to W&B, as a run in the sweep's group; MODE (auto, "
                             "online, offline, disabled) defaults to sweep.yaml's wandb.mode")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 2 with one line on stderr for a bad or unreadable directory."""
    args = build_parser().parse_args(argv)
    try:
        report = write_report(args.experiment_dir, args.metric, args.decimals, args.out, args.wandb, args.mode)
    except (FileNotFoundError, NotADirectoryError, ExperimentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {report}")
    where = str(report).rsplit("/", 1)[0] if is_uri(report) else report.parent
    print(f"tables in {where}/tables, plots in {where}/plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
