"""The paper's figures, drawn from an experiment's results and history frames.

Figures are built with `matplotlib.figure.Figure` directly (Agg canvas), never through pyplot, so no global
backend is switched and nothing needs a display. Each function writes one PNG and returns its path, or
returns None when the sweep lacks what the figure needs (one β, one init, no history): a small sweep must
still get a report.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MASS_COLUMNS = ("eval/mass_correct", "eval/mass_mistake", "eval/mass_other", "eval/mass_malformed")
LOGP_COLUMNS = {
    "train": ("train/chosen_logp_delta", "train/rejected_logp_delta"),
    "eval": ("eval/chosen_logp_delta", "eval/rejected_logp_delta"),
}
# Lines beyond this many make a figure unreadable; then lines are per loss only.
MAX_LINES = 8


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _loss_colors(losses: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per loss, the same in every figure of a report."""
    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ]  # fmt: skip
    return {loss: palette[i % len(palette)] for i, loss in enumerate(sorted(set(map(str, losses))))}


def _short(value) -> str:
    """Labels for parameter values: 0.1 not 0.100, a model path by its last component."""
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    text = str(value)
    return text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    return all(c in frame.columns and frame[c].notna().any() for c in columns)


def line_keys(frame: pd.DataFrame, candidates: Sequence[str] = ("beta", "spo_lambda")) -> list[str]:
    """Columns that split lines: the loss plus any of β, λ that vary, unless that gives too many lines.

    Averaging DPO at β=0.1 with DPO at β=0.5 would draw a curve no run followed, so varying parameters get
    their own lines when the figure stays readable.
    """
    keys = ["loss"] + [c for c in candidates if c in frame.columns and frame[c].nunique() > 1]
    if frame.groupby(keys, dropna=False).ngroups > MAX_LINES:
        return ["loss"]
    return keys


def _label(keys: list[str], values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    names = {"beta": "β", "spo_lambda": "λ"}
    parts = [str(values[0])] + [f"{names.get(k, k)}={_short(v)}" for k, v in zip(keys[1:], values[1:])]
    return " ".join(parts)


def plot_logp_evolution(history: pd.DataFrame, path: str | Path) -> Path | None:
    """Chosen and rejected log-prob change vs step: the likelihood-displacement picture (paper §2, finding 1).

    One line per loss (and per β/λ when they vary and the lines stay few), the mean over seeds with a
    ±1 std band. Uses the per-step training deltas when logged, else the (sparser) eval deltas.
    """
    source = next((cols for cols in LOGP_COLUMNS.values() if _has(history, *cols)), None)
    if source is None or not _has(history, "loss", "step"):
        return None
    keys = line_keys(history)
    colors = _loss_colors(history["loss"].dropna())
    styles = ["-", "--", ":", "-."]
    figure = _new_figure(10.0, 4.2)
    axes = figure.subplots(1, 2, sharey=True)
    titles = ("chosen  log π(y_w) − log π_0(y_w)", "rejected  log π(y_l) − log π_0(y_l)")
    for ax, column, title in zip(axes, source, titles):
        lines = history.dropna(subset=[column]).groupby(keys, sort=True, dropna=False)
        for i, (values, rows) in enumerate(lines):
            stats = rows.groupby("step")[column].agg(["mean", "std"]).fillna({"std": 0.0})
            loss = values[0] if isinstance(values, tuple) else values
            color, low, high = colors[str(loss)], stats["mean"] - stats["std"], stats["mean"] + stats["std"]
            ax.plot(stats.index, stats["mean"], color=color, linestyle=styles[i % len(styles)],
                    label=_label(keys, values))  # fmt: skip
            ax.fill_between(stats.index, low, high, color=color, alpha=0.2)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].set_ylabel(f"log-prob change ({source[0].split('/')[0]})")
    axes[1].legend(fontsize=8)
    return _save(figure, path)


def plot_accuracy_vs_beta(results: pd.DataFrame, path: str | Path, metric: str = "eval/accuracy",
                          initial: dict[str, float] | None = None) -> Path | None:
    """Final metric vs β on a log axis (β grids are geometric), one line per loss (and λ), error bars = std
    over seeds; `initial` (init name → the metric at step 0) as dashed reference lines. Needs two β."""
    if not _has(results, "loss", "beta", metric) or results["beta"].nunique() < 2:
        return None
    keys = line_keys(results, ("spo_lambda",))
    colors = _loss_colors(results["loss"].dropna())
    figure = _new_figure()
    ax = figure.subplots()
    for values, rows in results.dropna(subset=[metric]).groupby(keys, sort=True, dropna=False):
        stats = rows.groupby("beta")[metric].agg(["mean", "std"])
        loss = values[0] if isinstance(values, tuple) else values
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                    color=colors[str(loss)], label=_label(keys, values))  # fmt: skip
    for (name, value), style in zip(sorted((initial or {}).items()), itertools.cycle(("--", ":", "-."))):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"{name} at step 0: {value:.3g}")
    if (results["beta"].dropna() > 0).all():
        ax.set_xscale("log")
        betas = sorted(results["beta"].dropna().unique())
        ax.set_xticks(betas, [_short(b) for b in betas])
        ax.minorticks_off()
    ax.set_xlabel("β")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_beta_lambda_heatmap(
    results: pd.DataFrame, path: str | Path, metric: str = "eval/accuracy", loss: str = "spo"
) -> Path | None:
    """Mean metric over seeds on the β × λ grid of one loss (SPO); needs at least two values on each axis
    (one λ or one β is a line, which plot_accuracy_vs_beta draws: a one-row heatmap shows nothing)."""
    if not _has(results, "loss", "beta", "spo_lambda", metric):
        return None
    rows = results.loc[results["loss"] == loss].dropna(subset=[metric])
    grid = rows.pivot_table(index="spo_lambda", columns="beta", values=metric, aggfunc="mean")
    if min(grid.shape) < 2:
        return None
    figure = _new_figure()
    ax = figure.subplots()
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap="viridis")
    figure.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(grid.shape[1]), [_short(b) for b in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [_short(lam) for lam in grid.index])
    ax.set_xlabel("β")
    ax.set_ylabel("λ (spo_lambda)")
    ax.set_title(f"{loss}: mean {metric} over seeds", fontsize=10)
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="white", fontsize=8)
    return _save(figure, path)


def plot_init_sensitivity(results: pd.DataFrame, path: str | Path, metric: str = "eval/accuracy") -> Path | None:
    """Metric per initialization, grouped bars per loss with std error bars (paper §2, finding 2).

    Each bar pools all runs of a loss on that init (every β and λ), so it shows how much the outcome
    moves with the starting point, not the best achievable value.
    """
    if not _has(results, "loss", "init", metric) or results["init"].nunique() < 2:
        return None
    stats = results.dropna(subset=[metric]).groupby(["init", "loss"], sort=True)[metric].agg(["mean", "std"])
    inits = sorted(stats.index.get_level_values("init").unique(), key=str)
    losses = sorted(stats.index.get_level_values("loss").unique(), key=str)
    colors = _loss_colors(losses)
    width = 0.8 / len(losses)
    figure = _new_figure()
    ax = figure.subplots()
    for k, loss in enumerate(losses):
        x = [i + (k - (len(losses) - 1) / 2) * width for i in range(len(inits))]
        means = [stats["mean"].get((init, loss), np.nan) for init in inits]
        stds = [stats["std"].get((init, loss), np.nan) for init in inits]
        ax.bar(x, means, width, yerr=np.nan_to_num(stds), capsize=3, color=colors[str(loss)], label=str(loss))
    ax.set_xticks(range(len(inits)), [_short(i) for i in inits])
    ax.set_xlabel("initialization")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_mass_split(results: pd.DataFrame, path: str | Path, initial: pd.DataFrame | None = None) -> Path | None:
    """Where the probability mass goes: stacked mean mass_correct/mistake/other/malformed per loss (× init),
    after the bars of the initial weights to compare against: `initial` (index: init name, columns: the
    mass metrics at step 0), hatched and labelled "<init> (step 0)".

    This is the catastrophic-preference-shift picture (paper §2, finding 3): mass leaving the chosen answer
    may land on wrong or malformed outputs instead of correct ones.
    """
    columns = [c for c in MASS_COLUMNS if _has(results, c)]
    if not columns or not _has(results, "loss"):
        return None
    keys = ["loss", "init"] if "init" in results.columns and results["init"].nunique() > 1 else ["loss"]
    means = results.groupby(keys, sort=True, dropna=False)[columns].mean()
    labels = [" / ".join(_short(v) for v in (k if isinstance(k, tuple) else (k,))) for k in means.index]
    start = initial.reindex(columns=columns) if initial is not None else pd.DataFrame(columns=columns)
    start = start.dropna(how="all").sort_index()
    labels = [f"{_short(init)} (step 0)" for init in start.index] + labels
    heights = pd.concat([start, means], ignore_index=True) if len(start) else means.reset_index(drop=True)
    heights = heights.astype(float).fillna(0.0)
    colors = {"eval/mass_correct": "#2ca02c", "eval/mass_mistake": "#d62728", "eval/mass_other": "#7f7f7f",
              "eval/mass_malformed": "#9467bd"}  # fmt: skip
    figure = _new_figure(max(6.4, 0.6 * len(labels) + 2.0), 4.2)
    ax = figure.subplots()
    bottom = np.zeros(len(labels))
    for column in columns:
        bars = ax.bar(range(len(labels)), heights[column].to_numpy(), 0.7, bottom=bottom, color=colors[column],
                      label=column.split("mass_")[-1])  # fmt: skip
        for bar in bars.patches[: len(start)]:
            bar.set_hatch("//")
        bottom += heights[column].to_numpy()
    crowded = len(labels) > 4
    ax.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("mean probability mass")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the bars reach 1.0
    return _save(figure, path)


def plot_best_so_far(curves: dict[str, pd.DataFrame], path: str | Path, metric: str,
                     reruns: dict[str, tuple[float, float, float]] | None = None) -> Path | None:
    """The best score found so far against trials run and against training steps spent, one line per search.

    `curves`: a name → frame with `steps_so_far` and `best_so_far` (and `trials_so_far` for searchers, from
    `analysis.search.configurations`; PBT's `population_best` frames only go into the steps panel).
    `reruns`: name → (steps spent, mean, std) of the best configuration re-run with fresh seeds, drawn as
    markers with error bars at the steps the search spent.
    """
    curves = {name: frame for name, frame in curves.items() if not frame.empty}
    if not curves:
        return None
    with_trials = {name: frame for name, frame in curves.items() if "trials_so_far" in frame.columns}
    figure = _new_figure(10.0 if with_trials else 6.4, 4.2)
    axes = figure.subplots(1, 2 if with_trials else 1, sharey=True)
    axes = list(axes) if with_trials else [axes]
    colors = _loss_colors(curves)
    styles = dict(zip(curves, ["-", "--", ":", "-.", (0, (5, 1))] * len(curves)))  # identical curves stay visible
    if with_trials:
        for name, frame in with_trials.items():
            axes[0].step(frame["trials_so_far"], frame["best_so_far"], where="post", marker="o", markersize=3,
                         color=colors[name], linestyle=styles[name], label=name)
        axes[0].set_xlabel("trials run")
        axes[0].set_ylabel(f"best {metric} so far")
    steps_axis = axes[-1]
    spread = max(float(frame["steps_so_far"].max()) for frame in curves.values()) * 0.012
    for i, (name, frame) in enumerate(curves.items()):
        steps_axis.step(frame["steps_so_far"], frame["best_so_far"], where="post", marker="o", markersize=3,
                        color=colors[name], linestyle=styles[name], label=name)
        if reruns and name in reruns:
            spent, mean, std = reruns[name]
            shift = (i - (len(curves) - 1) / 2) * spread  # side by side where several searches spent the same
            steps_axis.errorbar([spent + shift], [mean], yerr=[std], marker="D", markersize=7, capsize=4,
                                color=colors[name], markeredgecolor="black", linestyle="none")
    steps_axis.set_xlabel("training steps spent")
    if not with_trials:
        steps_axis.set_ylabel(f"best {metric} so far")
    steps_axis.legend(fontsize=8)
    if reruns:
        steps_axis.set_title("◆ best configuration re-run with fresh seeds (mean ± std)", fontsize=9)
    return _save(figure, path)


def plot_pbt_lineage(history: pd.DataFrame, final: dict[str, float], path: str | Path, metric: str,
                     best_path: pd.DataFrame | None = None, best_label: str = "best trial's path") -> Path | None:
    """PBT's population over training: one panel per mutated value (hp/*), one line per trial coloured by
    its final `metric`, each exploit marked (×) where the trial took over another's checkpoint, with a dotted
    line from the donor's value there; `best_path` (analysis.search.schedule) drawn in black."""
    columns = [c for c in history.columns if c.startswith("hp/") and history[c].notna().any()]
    if not columns or not _has(history, "trial_id", "step"):
        return None
    import matplotlib

    scores = [v for v in final.values() if v == v]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    norm = matplotlib.colors.Normalize(vmin=low, vmax=high if high > low else low + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    figure = _new_figure(4.2 * len(columns) + 1.2, 4.2)
    axes = figure.subplots(1, len(columns), squeeze=False)[0]
    by_trial = {trial: rows.sort_values("step") for trial, rows in history.groupby("trial_id")}
    for ax, column in zip(axes, columns):
        for trial, rows in by_trial.items():
            score = final.get(trial, float("nan"))
            color = cmap(norm(score)) if score == score else "#bbbbbb"
            # A row's value is the one its steps trained with: it holds from the previous row to this one.
            ax.step(rows["step"], rows[column], where="pre", color=color, linewidth=1.0, alpha=0.9)
            exploits = rows.dropna(subset=["exploit/step"]) if "exploit/step" in rows else rows.iloc[:0]
            for _, row in exploits.iterrows():
                donor = by_trial.get(str(row["exploit/donor"]))
                at = donor[donor["step"] <= row["exploit/step"]] if donor is not None else None
                if at is not None and not at.empty:
                    ax.plot([row["exploit/step"], row["exploit/step"]], [at[column].iloc[-1], row[column]],
                            linestyle=":", color="black", linewidth=0.8)
                ax.plot([row["exploit/step"]], [row[column]], marker="x", color="black", markersize=5)
        if best_path is not None and not best_path.empty and column.removeprefix("hp/") in best_path:
            name = column.removeprefix("hp/")
            steps = [best_path["from_step"].iloc[0], *best_path["to_step"]]
            ax.step(steps, [best_path[name].iloc[0], *best_path[name]], where="pre", color="black", linewidth=2.2,
                    label=best_label)
            ax.legend(fontsize=8)
        values = history[column].dropna()
        if (values > 0).all() and values.max() / values.min() >= 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"hp/spo_lambda": "λ (spo_lambda)", "hp/beta": "β"}.get(column, column.removeprefix("hp/")),
                     fontsize=10)
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    figure.colorbar(mappable, ax=list(axes), label=f"final {metric}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")  # no tight_layout: it fights the shared colorbar
    return path


def plot_rounds(table: pd.DataFrame, path: str | Path, metric: str = "eval/accuracy") -> Path | None:
    """Self-training rounds (`analysis.tables.per_round`): the metric per round with its paired 95% interval
    of the change since round 0; the chosen (solid) and rejected (dashed) log-prob change on the held-out pairs
    at each round's end; the share of the round's own samples that were right; the pairs each round built."""
    mean = f"{metric}{' mean'}"
    if table.empty or mean not in table.columns or table["round"].nunique() < 2:
        return None
    keys = [k for k in line_keys(table) if k in table.columns]
    colors = _loss_colors(table["loss"].dropna() if "loss" in table.columns else ["all"])
    figure = _new_figure(10.0, 7.6)
    (acc, logp), (samples, pairs) = figure.subplots(2, 2)
    groups = list(table.groupby(keys, sort=True, dropna=False)) if keys else [("all", table)]
    for i, (values, rows) in enumerate(groups):
        rows = rows.sort_values("round")
        loss = (values[0] if isinstance(values, tuple) else values)
        color, label = colors[str(loss)], _label(keys, values) if keys else "all"
        shift = (i - (len(groups) - 1) / 2) * 0.04  # side by side, so the intervals do not hide each other
        acc.plot(rows["round"] + shift, rows[mean], color=color, marker="o", label=label)
        if {"ci low", "ci high"} <= set(rows.columns):
            start = rows.loc[rows["round"] == 0, mean]
            with_ci = rows.dropna(subset=["ci low", "ci high"])
            if not start.empty and not with_ci.empty:
                base = float(start.iloc[0])
                acc.vlines(with_ci["round"] + shift, base + with_ci["ci low"], base + with_ci["ci high"], color=color,
                           alpha=0.5, linewidth=3)
        for column, style in (("chosen Δ mean", "-"), ("rejected Δ mean", "--")):
            if column in rows.columns:
                shown = rows.loc[rows["round"] > 0]
                logp.plot(shown["round"], shown[column], color=color, linestyle=style, marker="o",
                          label=f"{label} {column.split()[0]}")
        for ax, column in ((samples, "samples right mean"), (pairs, "pairs mean")):
            if column in rows.columns:
                shown = rows.loc[rows["round"] > 0]
                ax.plot(shown["round"], shown[column], color=color, marker="o", label=label)
    acc.set_title(f"{metric} at each round's end (bars: 95% CI of the change since round 0)", fontsize=9)
    logp.set_title("held-out log-prob change in the round (chosen solid, rejected dashed)", fontsize=9)
    logp.axhline(0.0, color="black", linewidth=0.6)
    samples.set_title("the round's own samples: share right (policy at the round's start)", fontsize=9)
    pairs.set_title("pairs the round built", fontsize=9)
    for ax in (acc, logp, samples, pairs):
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc.legend(fontsize=8)
    logp.legend(fontsize=7)
    return _save(figure, path)
