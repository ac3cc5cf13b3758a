"""Comparison tables over seeds: summaries, best configurations, paired SPO − DPO differences, writers.

Every statistic is over seeds of one configuration: a "group" is one combination of the `by` columns, and
its runs differ only in seed (and in any parameter left out of `by`). The writers render "mean ± std"
cells with a fixed number of decimals in Markdown and LaTeX without tabulate or jinja2, and keep full
precision in CSV.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import parameter_columns

DEFAULT_BY = ("loss", "beta", "spo_lambda", "init")
MEAN_SUFFIX = " mean"
STD_SUFFIX = " std"


def _as_list(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def summary_table(
    results: pd.DataFrame, metrics: str | Sequence[str], by: str | Sequence[str] = DEFAULT_BY
) -> pd.DataFrame:
    """Mean, sample std (ddof=1, NaN for a single run) and run count `n` of each metric per group.

    Only the `by` columns and metrics present in `results` are used, so a sweep that did not vary `init`
    (or has not produced a metric yet) still gets a table. Means skip NaN values; `n` counts runs.
    Columns: the `by` columns, `n`, then `<metric> mean` and `<metric> std` for each metric.
    """
    keys = [c for c in _as_list(by) if c in results.columns]
    present = [m for m in _as_list(metrics) if m in results.columns]
    if not keys:
        # One group of everything: a sweep over seeds only.
        results = results.assign(_all="all")
        keys = ["_all"]
    grouped = results.groupby(keys, dropna=False, sort=True)
    table = grouped.size().rename("n").to_frame()
    for metric in present:
        values = grouped[metric]
        table[metric + MEAN_SUFFIX] = values.mean()
        table[metric + STD_SUFFIX] = values.std(ddof=1)
    table = table.reset_index()
    return table.drop(columns=["_all"], errors="ignore")


def config_columns(results: pd.DataFrame, exclude: Sequence[str] = ("seed",)) -> list[str]:
    """Parameters that define a configuration: every swept parameter except the seed."""
    return [p for p in parameter_columns(results) if p not in exclude]


def best_configs(
    results: pd.DataFrame,
    metric: str = "eval/accuracy",
    by: str = "loss",
    config: Sequence[str] | None = None,
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """For each value of `by` (each loss), the configuration with the best mean of `metric` over seeds.

    A configuration is one combination of `config` columns (default: every swept parameter except the
    seed). Ranking by the mean over seeds, not the best single run, keeps one lucky seed from winning.
    """
    if metric not in results.columns or by not in results.columns:
        return pd.DataFrame()
    config = [c for c in (config if config is not None else config_columns(results)) if c != by]
    table = summary_table(results, [metric], by=[by, *config])
    table = table.dropna(subset=[metric + MEAN_SUFFIX])
    if table.empty:
        return table
    order = table[metric + MEAN_SUFFIX]
    best_rows = (order if higher_is_better else -order).groupby(table[by], sort=True).idxmax()
    return table.loc[best_rows.to_numpy()].reset_index(drop=True)


def paired_runs(
    results: pd.DataFrame,
    metric: str,
    treatment: str = "spo",
    control: str = "dpo",
    match: Sequence[str] = ("beta", "init", "seed"),
) -> pd.DataFrame:
    """Treatment runs matched with the control run that shares the `match` keys; `diff` = treatment − control.

    Runs without a partner are dropped. When the control has several runs per key (a grid that also varied
    λ, which DPO ignores), their mean is the control value, so every treatment run pairs with one number.
    Columns: every treatment parameter, `treatment`, `control`, `diff`.
    """
    if "loss" not in results.columns or metric not in results.columns:
        return pd.DataFrame(columns=["treatment", "control", "diff"])
    keys = [k for k in match if k in results.columns]
    treated = results.loc[results["loss"] == treatment].dropna(subset=[metric])
    controls = results.loc[results["loss"] == control].dropna(subset=[metric])
    params = [p for p in parameter_columns(results) if p != "loss"]
    treated = treated[params + [metric]].rename(columns={metric: "treatment"})
    if keys:
        control_values = controls.groupby(keys, dropna=False)[metric].mean().rename("control").reset_index()
        pairs = treated.merge(control_values, on=keys, how="inner")
    else:
        pairs = treated.assign(control=controls[metric].mean()).dropna(subset=["control"])
    pairs["diff"] = pairs["treatment"] - pairs["control"]
    return pairs.reset_index(drop=True)


def bootstrap_interval(
    values: np.ndarray, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; deterministic for a given seed.

    With a handful of seeds per cell a normal approximation is not credible; the percentile bootstrap makes
    no shape assumption (and honestly collapses to a point when there is one pair).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_differences(
    results: pd.DataFrame,
    metric: str,
    treatment: str = "spo",
    control: str = "dpo",
    match: Sequence[str] = ("beta", "init", "seed"),
    group_by: Sequence[str] = ("beta", "init"),
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean treatment − control difference and its bootstrap interval per (β, init) group and overall.

    Matching on seed removes the between-seed noise shared by both methods (same data order, same init
    noise), which is what makes a few seeds enough. Treatment parameters that vary outside the match keys
    (typically `spo_lambda`) are kept apart: each value gets its own rows, never pooled. The overall rows
    have "all" in the `group_by` columns.
    Columns: the group columns, `n_pairs`, `treatment mean`, `control mean`, `diff mean`, `ci low`, `ci high`.
    """
    pairs = paired_runs(results, metric, treatment, control, match)
    groups = [g for g in group_by if g in pairs.columns]
    varying = [
        p
        for p in pairs.columns
        if p not in (*match, *groups, "treatment", "control", "diff") and pairs[p].nunique(dropna=False) > 1
    ]
    columns = [*groups, *varying, "n_pairs", "treatment mean", "control mean", "diff mean", "ci low", "ci high"]
    if pairs.empty:
        return pd.DataFrame(columns=columns)

    def summarize(frame: pd.DataFrame) -> dict:
        low, high = bootstrap_interval(frame["diff"].to_numpy(), n_resamples, confidence, seed)
        return {
            "n_pairs": len(frame),
            "treatment mean": frame["treatment"].mean(),
            "control mean": frame["control"].mean(),
            "diff mean": frame["diff"].mean(),
            "ci low": low,
            "ci high": high,
        }

    rows = []
    for key, frame in _groups(pairs, [*groups, *varying]):
        rows.append({**key, **summarize(frame)})
    if groups:
        for key, frame in _groups(pairs, varying):
            rows.append({**{g: "all" for g in groups}, **key, **summarize(frame)})
    return pd.DataFrame(rows, columns=columns)


def _item_vector(value) -> np.ndarray | None:
    """A per-question outcome list from history (a list or array cell), or None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return np.asarray(list(value), dtype=float)


def start_and_end(results: pd.DataFrame, history: pd.DataFrame, metric: str,
                  items: str | None = "eval/answers_correct") -> pd.DataFrame:
    """One row per run that reported `metric` at step 0 (the initial weights, `train.eval_on_start`): its
    parameters, `before` (step 0), `after` (its final value in results.csv) and, where the history holds the
    per-question outcomes `items`, the outcome vectors `before items` / `after items` (first and last step)."""
    params = parameter_columns(results)
    if metric not in results.columns or metric not in history.columns or "step" not in history.columns:
        return pd.DataFrame(columns=[*params, "before", "after"])
    rows = []
    for trial_id, steps in history.sort_values("step").groupby("trial_id", sort=False):
        start = steps.loc[steps["step"] == 0, metric].dropna()
        final = results.loc[results["trial_id"] == trial_id]
        if start.empty or final.empty or pd.isna(final[metric].iloc[0]):
            continue
        row = {**final[params].iloc[0].to_dict(), "trial_id": trial_id, "before": float(start.iloc[0]),
               "after": float(final[metric].iloc[0])}
        if items and items in steps.columns:
            outcomes = [(step, _item_vector(v)) for step, v in zip(steps["step"], steps[items])]
            outcomes = [(step, v) for step, v in outcomes if v is not None]
            if len(outcomes) >= 2 and outcomes[0][0] == 0 and outcomes[0][1].shape == outcomes[-1][1].shape:
                row["before items"], row["after items"] = outcomes[0][1], outcomes[-1][1]
        rows.append(row)
    return pd.DataFrame(rows)


def paired_change_interval(changes: np.ndarray, n_resamples: int = 10_000, confidence: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean change over a (runs × questions) matrix of after − before outcomes:
    each resample draws runs (seeds) and questions with replacement, the same questions for every run, so
    both the seed-to-seed spread and the finite question set are in the interval, while each question is
    compared with itself before and after (the pairing)."""
    changes = np.atleast_2d(np.asarray(changes, dtype=float))
    runs, questions = changes.shape
    if changes.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    run_weights = np.stack([np.bincount(r, minlength=runs) for r in rng.integers(0, runs, (n_resamples, runs))])
    item_weights = np.stack([np.bincount(q, minlength=questions)
                             for q in rng.integers(0, questions, (n_resamples, questions))])
    means = np.einsum("ri,ij,rj->r", run_weights, changes, item_weights) / (runs * questions)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def before_after(results: pd.DataFrame, history: pd.DataFrame, metric: str = "eval/accuracy",
                 by: Sequence[str] = DEFAULT_BY, items: str | None = "eval/answers_correct",
                 n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """`metric` before training (step 0) and after, per configuration (the `by` columns; runs differ in seed):
    the means, the mean change and its paired bootstrap interval — over runs and questions where the history
    holds each question's outcome (`paired_change_interval`), else over runs (`bootstrap_interval`).
    Columns: the `by` columns, `n`, `questions`, `before mean`, `after mean`, `change mean`, `ci low`, `ci high`."""
    runs = start_and_end(results, history, metric, items)
    keys = [k for k in by if k in runs.columns]
    columns = [*keys, "n", "questions", "before mean", "after mean", "change mean", "ci low", "ci high"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, frame in _groups(runs, keys):
        paired = "after items" in frame.columns and frame["after items"].notna().all()
        if paired:
            changes = np.stack([a - b for a, b in zip(frame["after items"], frame["before items"])])
            low, high = paired_change_interval(changes, n_resamples, confidence, seed)
        else:
            changes = (frame["after"] - frame["before"]).to_numpy()[:, None]
            low, high = bootstrap_interval(changes[:, 0], n_resamples, confidence, seed)
        rows.append({**key, "n": len(frame), "questions": changes.shape[1] if paired else float("nan"),
                     "before mean": frame["before"].mean(), "after mean": frame["after"].mean(),
                     "change mean": (frame["after"] - frame["before"]).mean(), "ci low": low, "ci high": high})
    return pd.DataFrame(rows, columns=columns)


ROUND_COLUMNS = {  # history column → the per-round table's name for it
    "eval/chosen_logp_delta": "chosen Δ", "eval/rejected_logp_delta": "rejected Δ",
    "sampler/sample_accuracy": "samples right", "sampler/prompts_with_pair": "prompts with a pair",
    "sampler/pairs": "pairs", "eval/ended_share": "ended",
}
FROM_START_COLUMNS = {"eval/chosen_logps": "chosen from init", "eval/retention_logp": "retention from init"}


def round_ends(results: pd.DataFrame, history: pd.DataFrame, metric: str = "eval/accuracy",
               items: str | None = "eval/answers_correct") -> pd.DataFrame:
    """One row per run and round of a self-training sweep (`data.sampled_pairs.rounds`, history's `round`
    column): round 0 is step 0 (the initial weights, `train.eval_on_start`), round r the last evaluated step of
    round r. Columns: the run's parameters, `trial_id`, `round`, `step`, `metric`, the `ROUND_COLUMNS` present
    (the `sampler/*` ones describe the round's own table: samples of the policy that *started* the round), the
    `FROM_START_COLUMNS` as the change since step 0 (on the held-out pairs every round shares), and `items`
    (each question's outcome) where logged. Empty without a `round` column."""
    params = parameter_columns(results)
    if "round" not in history.columns or metric not in history.columns:
        return pd.DataFrame(columns=[*params, "trial_id", "round", "step", metric])
    rows = []
    for trial_id, steps in history.sort_values("step").groupby("trial_id", sort=False):
        final = results.loc[results["trial_id"] == trial_id]
        if final.empty:
            continue
        evaluated = steps.dropna(subset=[metric])
        start = evaluated.loc[evaluated["step"] == 0]
        ends = evaluated.loc[evaluated["step"] > 0].groupby("round", sort=True).tail(1)
        if not start.empty:
            ends = pd.concat([start.tail(1).assign(round=0), ends])
        first = ends.iloc[0] if not ends.empty else None
        for _, end in ends.iterrows():
            row = {**final[params].iloc[0].to_dict(), "trial_id": trial_id, "round": int(end["round"]),
                   "step": int(end["step"]), metric: float(end[metric])}
            row.update({name: end[column] for column, name in ROUND_COLUMNS.items() if column in end.index})
            if first is not None and first["step"] == 0:
                row.update({name: end[column] - first[column] for column, name in FROM_START_COLUMNS.items()
                            if column in end.index})
            if items and items in end.index:
                row["items"] = _item_vector(end[items])
            rows.append(row)
    return pd.DataFrame(rows)


def per_round(ends: pd.DataFrame, metric: str = "eval/accuracy", by: Sequence[str] = DEFAULT_BY,
              n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The per-round table of a self-training sweep from `round_ends`: per configuration (the `by` columns)
    and round, `n` runs, the metric's mean, its change since round 0 with the paired bootstrap interval over
    seeds and questions (`paired_change_interval`; over seeds alone where no per-question outcomes were logged),
    and the means (± std over seeds) of the other round columns."""
    keys = [k for k in by if k in ends.columns]
    if ends.empty:
        return pd.DataFrame(columns=[*keys, "round", "n"])
    rows = []
    shown = [c for c in [*ROUND_COLUMNS.values(), *FROM_START_COLUMNS.values()] if c in ends.columns]
    for key, frame in _groups(ends, keys):
        start = frame.loc[frame["round"] == 0].set_index("trial_id")
        for round_number, runs in frame.groupby("round", sort=True):
            row = {**key, "round": round_number, "n": len(runs), f"{metric} mean": runs[metric].mean()}
            paired = runs.loc[runs["trial_id"].isin(start.index)]
            if round_number > 0 and not paired.empty:
                before = start.loc[paired["trial_id"]]
                row["change mean"] = float((paired[metric].to_numpy() - before[metric].to_numpy()).mean())
                if "items" in paired.columns and all(isinstance(v, np.ndarray) for v in
                                                     [*paired["items"], *before["items"]]):
                    changes = np.stack([a - b for a, b in zip(paired["items"], before["items"])])
                    row["ci low"], row["ci high"] = paired_change_interval(changes, n_resamples, confidence, seed)
                else:
                    row["ci low"], row["ci high"] = bootstrap_interval(
                        paired[metric].to_numpy() - before[metric].to_numpy(), n_resamples, confidence, seed)
            for column in shown:
                row[column + MEAN_SUFFIX] = runs[column].mean()
                row[column + STD_SUFFIX] = runs[column].std(ddof=1)
            rows.append(row)
    return pd.DataFrame(rows)


def round_differences(ends: pd.DataFrame, treatment: str, control: str, metric: str = "eval/accuracy",
                      label: str = "loss", match: Sequence[str] = ("seed",), n_resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """`metric` of the `treatment` runs minus the `control` runs (by the `label` column) per round, runs
    matched by the `match` keys (the same seed: the same round-1 data order); the interval resamples seeds and,
    where each question's outcome was logged, the questions too, each compared with itself.
    Columns: `round`, `n_pairs`, `diff mean`, `ci low`, `ci high`."""
    columns = ["round", "n_pairs", "diff mean", "ci low", "ci high"]
    keys = [k for k in match if k in ends.columns]
    if ends.empty or label not in ends.columns:
        return pd.DataFrame(columns=columns)
    pairs = ends.loc[ends[label] == treatment].merge(ends.loc[ends[label] == control], on=[*keys, "round"],
                                                     suffixes=("", " control"))
    rows = []
    for round_number, frame in pairs.groupby("round", sort=True):
        diffs = frame[metric].to_numpy() - frame[f"{metric} control"].to_numpy()
        if "items" in frame.columns and all(isinstance(v, np.ndarray) for v in
                                            [*frame["items"], *frame["items control"]]):
            low, high = paired_change_interval(np.stack([a - b for a, b in zip(frame["items"],
                                                                               frame["items control"])]),
                                               n_resamples, confidence, seed)
        else:
            low, high = bootstrap_interval(diffs, n_resamples, confidence, seed)
        rows.append({"round": round_number, "n_pairs": len(frame), "diff mean": float(diffs.mean()),
                     "ci low": low, "ci high": high})
    return pd.DataFrame(rows, columns=columns)


def _groups(frame: pd.DataFrame, keys: list[str]):
    """Yield ({column: value}, rows) per group; one group of everything when there are no keys."""
    if not keys:
        yield {}, frame
        return
    for values, rows in frame.groupby(keys, dropna=False, sort=True):
        yield dict(zip(keys, values)), rows


# ---------------------------------------------------------------------------------------------- writers


def _format_value(value, decimals: int) -> str:
    """Floats with fixed decimals, integers and text as they are, missing values as an empty cell."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.{decimals}f}"
    return str(value)


def _format_parameter(value) -> str:
    """Parameter values as written in the sweep (0.1, not 0.100): they are labels, not measurements."""
    if isinstance(value, (float, np.floating)) and not np.isnan(value):
        return f"{value:g}"
    return _format_value(value, 3)


def display_frame(df: pd.DataFrame, decimals: int = 3, plus_minus: str = " ± ") -> pd.DataFrame:
    """Strings for display: each `<m> mean`/`<m> std` column pair becomes one `<m>` column of "mean ± std".

    A missing std (one run) shows the mean alone. Parameter columns keep their natural form (β = 0.1).
    """
    out = {}
    for column in df.columns:
        if column.endswith(STD_SUFFIX) and column[: -len(STD_SUFFIX)] + MEAN_SUFFIX in df.columns:
            continue
        if column.endswith(MEAN_SUFFIX) and column[: -len(MEAN_SUFFIX)] + STD_SUFFIX in df.columns:
            name = column[: -len(MEAN_SUFFIX)]
            means, stds = df[column], df[name + STD_SUFFIX]
            out[name] = [_mean_std(m, s, decimals, plus_minus) for m, s in zip(means, stds)]
        elif _is_label_column(column):
            out[column] = [_format_parameter(v) for v in df[column]]
        else:
            out[column] = [_format_value(v, decimals) for v in df[column]]
    return pd.DataFrame(out, index=range(len(df)), dtype=object)


# Statistics columns written by this module; every other column without a "/" is a parameter (a label).
STAT_COLUMNS = ("n", "n_pairs", "treatment mean", "control mean", "diff mean", "ci low", "ci high")


def _is_label_column(column: str) -> bool:
    return "/" not in column and column not in STAT_COLUMNS and not column.endswith((MEAN_SUFFIX, STD_SUFFIX))


def _mean_std(mean, std, decimals: int, plus_minus: str) -> str:
    if mean is None or pd.isna(mean):
        return ""
    if std is None or pd.isna(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f}{plus_minus}{std:.{decimals}f}"


def to_markdown(df: pd.DataFrame, decimals: int = 3) -> str:
    """A GitHub-flavoured Markdown table with "mean ± std" cells."""
    shown = display_frame(df, decimals)

    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(shown.columns), row(["---"] * len(shown.columns))]
    lines += [row(values) for values in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (metric names are full of underscores)."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame, decimals: int = 3) -> str:
    """A booktabs `tabular` with "$mean \\pm std$" cells; needs only `\\usepackage{booktabs}`."""
    marker = "\x00PM\x00"  # placed before escaping so the ± survives as math
    shown = display_frame(df, decimals, plus_minus=marker)

    def cell(value) -> str:
        text = latex_escape(value)
        if marker in text:
            mean, std = text.split(marker)
            return f"${mean} \\pm {std}$"
        return text

    align = "".join("r" if _is_numeric_column(df, c) else "l" for c in shown.columns)
    lines = [f"\\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(c) for c in shown.columns) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(cell(v) for v in values) + r" \\" for values in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _is_numeric_column(df: pd.DataFrame, shown_name: str) -> bool:
    column = shown_name if shown_name in df.columns else shown_name + MEAN_SUFFIX
    return column in df.columns and pd.api.types.is_numeric_dtype(df[column])


def write_table(df: pd.DataFrame, stem: str | Path, decimals: int = 3) -> list[Path]:
    """Write `<stem>.md`, `<stem>.tex` and `<stem>.csv` (full precision); return the three paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")]
    paths[0].write_text(to_markdown(df, decimals), encoding="utf-8")
    paths[1].write_text(to_latex(df, decimals), encoding="utf-8")
    df.to_csv(paths[2], index=False)
    return paths
