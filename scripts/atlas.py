"""The loss atlas: which losses displace the chosen reply, and does SPO fix each of them?

    .venv/bin/python scripts/atlas.py results/atlas [--figure docs/img/atlas.png]
    .venv/bin/python scripts/atlas.py results/atlas_options
    .venv/bin/python scripts/atlas.py results/atlas-smollm2 results/atlas-smollm2-seeds   # one table, seeds 0-2

Reads an experiment of `sweeps/atlas.yaml` (`loss.name: spo` over every base it can wrap, λ ∈ {0, 1}: λ = 0 is
exactly the base loss) and prints, per base loss, the final held-out chosen and rejected log-prob deltas, the
answer-mass split and greedy accuracy (mean ± std over seeds) without and with SPO, then the paired SPO − base
differences per loss (matched on seed; 95% percentile bootstrap of the mean) for accuracy and the chosen delta.
The figure puts one arrow per loss from (chosen Δ, accuracy change from the init) without SPO to the same with it.
An arm is a base loss with the sweep's other swept settings where they are on (`sweeps/atlas_options.yaml`:
"dpo + ld_alpha 0.5 + sync").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import load_experiment  # noqa: E402
from analysis.tables import bootstrap_interval, paired_change_interval, start_and_end, to_markdown  # noqa: E402

METRICS = ["eval/accuracy", "eval/chosen_logp_delta", "eval/rejected_logp_delta", "eval/mass_correct",
           "eval/mass_mistake", "eval/mass_other", "eval/mass_malformed"]
PAIRED = ["eval/accuracy", "eval/chosen_logp_delta"]


#: Columns that name no arm: the loss under SPO, its λ (the two sides of each arm), the seed, fixed settings.
NOT_ARMS = ("loss", "beta", "spo_lambda", "init", "seed", "base_loss")


def arms(results: pd.DataFrame, params: list[str], base: str) -> pd.Series:
    """Each trial's arm: its base loss (the `base_loss` column, else `base`), then every other swept setting
    that is on (a number, or true), e.g. "dpo + ld_alpha 0.5 + sync"."""
    names = results["base_loss"] if "base_loss" in results else pd.Series(base, index=results.index)
    labels = names.astype(str)
    for column in [c for c in params if c not in NOT_ARMS]:
        values = results[column]
        on = values.notna() & (values.astype(str).str.lower() != "false")
        shown = values.map(lambda v: column if str(v).lower() == "true" else f"{column} {v}")
        labels = labels.where(~on, labels + " + " + shown)
    return labels


def atlas_tables(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per base loss and λ: mean ± std of METRICS over seeds; per base loss: paired SPO − base of PAIRED). A
    metric the task does not report (the answer-mass split is the built-in task's) is left out."""
    metrics = [m for m in METRICS if m in results.columns]
    rows = []
    for (base, lam), group in results.groupby(["arm", "spo_lambda"], sort=False):
        row = {"loss": base, "SPO": "λ 1" if lam > 0 else "–", "seeds": len(group)}
        for metric in metrics:
            values = group[metric].astype(float)
            spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""  # one seed: no spread to show
            row[metric.removeprefix("eval/")] = f"{values.mean():.3f}{spread}"
        rows.append(row)
    summary = pd.DataFrame(rows)
    paired_rows = []
    for base, group in results.groupby("arm", sort=False):
        wide = group.pivot_table(index="seed", columns="spo_lambda", values=PAIRED)
        row = {"loss": base}
        for metric in PAIRED:
            if (metric, 1.0) not in wide or (metric, 0.0) not in wide:
                continue  # one arm has no finished trial yet
            diff = (wide[(metric, 1.0)] - wide[(metric, 0.0)]).dropna().to_numpy()
            low, high = bootstrap_interval(diff)
            interval = f" [{low:+.3f}, {high:+.3f}]" if len(diff) > 1 else ""  # one pair: no interval
            row[f"SPO − base {metric.removeprefix('eval/')}"] = f"{diff.mean():+.3f}{interval}"
        row["pairs"] = len(wide)
        paired_rows.append(row)
    return summary, pd.DataFrame(paired_rows)


def question_paired(results: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """Per arm: SPO − base greedy accuracy with its 95% interval over seeds *and* questions
    (`paired_change_interval`: each held-out question compared with itself, in the same seed), where the
    trials logged each question's outcome (`eval/answers_correct`); empty where they did not."""
    if outcomes.empty or "after items" not in outcomes:
        return pd.DataFrame()
    items = outcomes.set_index("trial_id")["after items"]
    rows = []
    for base, group in results.groupby("arm", sort=False):
        by_side = {lam: side.set_index("seed")["trial_id"] for lam, side in group.groupby("spo_lambda")}
        if 0.0 not in by_side or 1.0 not in by_side:
            continue
        seeds = sorted(set(by_side[0.0].index) & set(by_side[1.0].index))
        pairs = [(by_side[1.0][s], by_side[0.0][s]) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a in items.index and b in items.index]
        if not pairs:
            continue
        changes = np.stack([items[a] - items[b] for a, b in pairs])
        low, high = paired_change_interval(changes)
        rows.append({"loss": base, "SPO − base accuracy [95% CI, seeds × questions]":
                     f"{changes.mean():+.3f} [{low:+.3f}, {high:+.3f}]", "seeds": len(pairs)})
    return pd.DataFrame(rows)


def draw(results: pd.DataFrame, init_accuracy: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = results.groupby(["arm", "spo_lambda"], sort=False)[["eval/chosen_logp_delta", "eval/accuracy"]].mean()
    fig, ax = plt.subplots(figsize=(8, 6))
    for base in dict.fromkeys(results["arm"]):
        if (base, 0.0) not in means.index or (base, 1.0) not in means.index:
            continue
        x0, y0 = means.loc[(base, 0.0)]
        x1, y1 = means.loc[(base, 1.0)]
        y0, y1 = y0 - init_accuracy, y1 - init_accuracy
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 1})
        ax.plot([x0], [y0], "o", color="tab:red", ms=4)
        ax.annotate(base, (x0, y0), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1)  # apo_down's −27 nats beside the rest's −6 to +0.15
    ax.axvline(0, color="grey", lw=0.5)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("held-out chosen log-prob Δ against the reference (nats; linear within ±1, log beyond)")
    ax.set_ylabel("greedy accuracy − the init's")
    ax.set_title("Each loss without SPO (dot) → with SPO, λ 1 (arrow head); mean of 3 seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="one experiment, or several of one sweep file run with "
                        "different seeds (their trials pooled)")
    parser.add_argument("--figure", default=None, help="where to write the arrows figure (PNG)")
    args = parser.parse_args()
    parts, outcomes, starts, finished, trials = [], [], [], 0, 0
    for directory in args.experiments:
        exp = load_experiment(directory)
        results = exp.results.copy()
        sweep = yaml.safe_load((exp.path / "sweep.yaml").read_text()) if (exp.path / "sweep.yaml").exists() else {}
        results["arm"] = arms(results, exp.params, str((sweep.get("loss") or {}).get("base", "dpo")))
        parts.append(results)
        outcomes.append(start_and_end(exp.results, exp.history, "eval/accuracy") if exp.history is not None
                        else pd.DataFrame())
        if exp.history is not None:
            starts += exp.history[exp.history["step"] == 0]["eval/accuracy"].dropna().tolist()
        finished, trials = finished + len(results), trials + len(exp.all_results)
    results = pd.concat(parts, ignore_index=True)
    summary, paired = atlas_tables(results)
    init_accuracy = float(np.mean(starts)) if len(starts) else float("nan")
    print(f"{finished} trials TERMINATED of {trials}; the init's accuracy {init_accuracy:.3f}\n")
    print(to_markdown(summary))
    print()
    print(to_markdown(paired))
    by_question = question_paired(results, pd.concat(outcomes, ignore_index=True))
    if not by_question.empty:
        print()
        print(to_markdown(by_question))
    if args.figure:
        draw(results, init_accuracy, Path(args.figure))
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
