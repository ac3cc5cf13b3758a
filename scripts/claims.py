"""The counts behind each claim statement of docs/results.md, from the experiments `scripts/results.sh` writes.

    .venv/bin/python scripts/claims.py [RESULTS_DIR]      # default: results

Reads results.csv of results/{beta,beta_wide,lambda,init,baselines,rpo,sft_free,sft_free_dpo,one_step}
(and history.parquet of the last three; finished trials only, through
`analysis.collect`), evaluates each initialization the experiments start from on the experiments' own
evaluation problems (the "before training" row: accuracy and mass split; log-prob deltas are 0 there by
definition), and prints Markdown: one block per claim with the counts the statements quote. Experiments that
are missing are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import load_experiment  # noqa: E402
from analysis.tables import paired_differences, summary_table, to_markdown  # noqa: E402

MASS = ["eval/mass_correct", "eval/mass_mistake", "eval/mass_other", "eval/mass_malformed"]
DELTAS = ["eval/chosen_logp_delta", "eval/rejected_logp_delta"]


def experiment(root: Path, name: str) -> pd.DataFrame | None:
    if not (root / name / "results.csv").exists():
        print(f"\n_(no experiment {root / name}: skipped)_")
        return None
    results = load_experiment(root / name).results
    if results.empty or "eval/mass_other" not in results:  # no finished trial (yet), or no mass metrics
        print(f"\n_(experiment {root / name} has no finished trial with mass metrics: skipped)_")
        return None
    results["eval/off_target"] = results["eval/mass_other"] + results["eval/mass_malformed"]  # neither right nor a known mistake
    return results


def init_evaluation(root: Path, name: str, init: str) -> dict:
    """The init `init` evaluated as a trial of experiment `name` evaluates (same task config, same problems)."""
    import torch

    from spo_ray.config import first_point, validate_run
    from spo_ray.tasks import evaluate_init

    raw = yaml.safe_load((root / name / "sweep.yaml").read_text())
    raw.pop("swept", None)
    point = first_point(raw)
    point["model"]["init"] = init
    sweep = validate_run(point)
    torch.set_num_threads(2)
    _, metrics = evaluate_init(sweep.run_config(), cache_dir=sweep.cache_dir)
    return {"accuracy": metrics["accuracy"], **{m: metrics[m.split("/")[1]] for m in MASS}}


def count(mask: pd.Series) -> str:
    return f"{int(mask.sum())} of {len(mask)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default="results")
    root = Path(parser.parse_args().root)

    print("## Before training: each init on the sweeps' 100 evaluation problems\n")
    before = {}
    source = next((n for n in ("init", "beta", "sft_free") if (root / n / "sweep.yaml").exists()), None)
    if source is None:
        print(f"_(no init, beta or sft_free experiment under {root}: skipped)_")
    inits = {None: (), "sft_free": ("base", "sft_short")}.get(source, ("base", "sft_short", "sft_long"))
    for init in inits:
        before[init] = init_evaluation(root, source, init)
        b = before[init]
        print(f"- {init}: accuracy {b['accuracy']:.3f}; mass correct {b['eval/mass_correct']:.3f}, mistake "
              f"{b['eval/mass_mistake']:.3f}, other {b['eval/mass_other']:.3f}, malformed "
              f"{b['eval/mass_malformed']:.3f} (off-target {b['eval/mass_other'] + b['eval/mass_malformed']:.3f})")

    wide = experiment(root, "beta_wide")
    if wide is not None:
        print("\n## Claim 1: likelihood displacement (beta_wide: 4 β × 3 seeds per loss, from sft_short)\n")
        for loss, runs in wide.groupby("loss"):
            chosen, rejected = runs["eval/chosen_logp_delta"], runs["eval/rejected_logp_delta"]
            print(f"- {loss}: chosen log-prob fell in {count(chosen < 0)} runs (mean Δ {chosen.mean():+.2f}, "
                  f"range {chosen.min():+.2f} … {chosen.max():+.2f}); rejected fell in {count(rejected < 0)} "
                  f"(mean Δ {rejected.mean():+.2f}); rejected fell further than chosen in "
                  f"{count(rejected < chosen)}")
        print("\n## Claim 3: mass on answers that are neither correct nor a known mistake (beta_wide)\n")
        start = before["sft_short"]["eval/mass_other"] + before["sft_short"]["eval/mass_malformed"]
        for loss, runs in wide.groupby("loss"):
            grew = runs["eval/off_target"] > start
            print(f"- {loss}: off-target mass above sft_short's {start:.3f} in {count(grew)} runs "
                  f"(mean {runs['eval/off_target'].mean():.3f}, max {runs['eval/off_target'].max():.3f}); "
                  f"mass on the correct answer mean {runs['eval/mass_correct'].mean():.3f} "
                  f"(sft_short: {before['sft_short']['eval/mass_correct']:.3f})")
        print("\n## Claim 4: SPO − DPO, paired by β and seed (beta_wide)\n")
        for metric in ("eval/accuracy", "eval/chosen_logp_delta", "eval/off_target"):
            paired = paired_differences(wide, metric)
            overall = paired[paired["beta"] == "all"].iloc[0]
            print(f"- {metric}: SPO {overall['treatment mean']:.3f} vs DPO {overall['control mean']:.3f}, "
                  f"difference {overall['diff mean']:+.3f} [95% CI {overall['ci low']:+.3f}, "
                  f"{overall['ci high']:+.3f}] over {int(overall['n_pairs'])} pairs")
        spo = wide[wide["loss"] == "spo"]
        print(f"- SPO chosen log-prob stayed within 0.5 nats of the reference or above in "
              f"{count(spo['eval/chosen_logp_delta'] > -0.5)} runs")

    demo = experiment(root, "beta")
    if wide is not None and demo is not None:
        print("\n## Reproduction: the default sweep (2 seeds) against beta_wide (3 seeds)\n")
        metrics = ["eval/accuracy", *DELTAS]
        a = summary_table(demo, metrics, by=["loss", "beta"]).set_index(["loss", "beta"])
        b = summary_table(wide, metrics, by=["loss", "beta"]).set_index(["loss", "beta"])
        for metric in metrics:
            inside = []
            for key in a.index:
                spread = max(b.loc[key, f"{metric} std"], a.loc[key, f"{metric} std"])
                inside.append(abs(a.loc[key, f"{metric} mean"] - b.loc[key, f"{metric} mean"]) <= spread)
            print(f"- {metric}: the two means differ by at most one seed std in {count(pd.Series(inside))} cells")

    lam = experiment(root, "lambda")
    if lam is not None:
        print("\n## λ (lambda: spo, β = 0.1, 3 seeds)\n")
        print(to_markdown(summary_table(lam, ["eval/accuracy", *DELTAS, "eval/off_target"], by=["spo_lambda"])))

    init = experiment(root, "init")
    if init is not None:
        print("\n## Claim 2: sensitivity to the initialization (init: 3 seeds per cell)\n")
        table = summary_table(init, ["eval/accuracy", *DELTAS, "eval/off_target"], by=["loss", "init"])
        table.insert(2, "accuracy before", table["init"].map(lambda i: before[i]["accuracy"]))
        print(to_markdown(table))
        for loss, runs in init.groupby("loss"):
            means = runs.groupby("init")["eval/accuracy"].mean()
            change = {i: means[i] - before[i]["accuracy"] for i in means.index}
            print(f"- {loss}: mean accuracy across inits {means.min():.3f} … {means.max():.3f} "
                  f"(spread {means.max() - means.min():.3f}); change from each init: "
                  + ", ".join(f"{i} {d:+.3f}" for i, d in change.items()))
            print(f"  chosen log-prob fell in {count(runs['eval/chosen_logp_delta'] < 0)} runs")

    frames = [f for f in (experiment(root, "baselines"), experiment(root, "rpo")) if f is not None]
    if frames:
        print("\n## Baselines (β = 0.1, sft_short, 3 seeds; DPO and SPO at β = 0.1 from beta_wide)\n")
        runs = pd.concat(frames, ignore_index=True)
        if "nll_weight" in runs.columns:
            runs.loc[runs["nll_weight"].fillna(0) > 0, "loss"] = "rpo (dpo + nll)"
        if wide is not None:
            runs = pd.concat([wide[wide["beta"] == 0.1], runs], ignore_index=True)
        runs.loc[(runs["loss"] == "spo") & runs["trial_id"].isin(frames[0]["trial_id"]), "loss"] = "spo (over simpo)"
        print(to_markdown(summary_table(runs, ["eval/accuracy", *DELTAS, "eval/off_target"], by=["loss"])))

    sft_free_claim(root, before)


def method(runs: pd.DataFrame) -> pd.Series:
    """dpo, rpo (dpo + nll), spo/reference, spo/one_step: the four ways the SFT-free runs treat y_w."""
    nll = runs["nll_weight"].fillna(0) if "nll_weight" in runs.columns else pd.Series(0.0, index=runs.index)
    estimator = runs["spo_estimator"] if "spo_estimator" in runs.columns else pd.Series("reference", index=runs.index)
    return pd.Series([("rpo (dpo + nll)" if w > 0 else "dpo") if loss == "dpo" else f"spo/{e}"
                      for loss, w, e in zip(runs["loss"], nll, estimator)], index=runs.index)


def per_trial(history: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Each trial's mean over its logged training windows (10 steps each) of `metrics`."""
    present = [m for m in metrics if m in history.columns]
    return history.dropna(subset=["train/loss"]).groupby("trial_id")[present].mean()


def sft_free_claim(root: Path, before: dict) -> None:
    main, dpo = experiment(root, "sft_free"), experiment(root, "sft_free_dpo")
    if main is None or dpo is None:
        return
    print("\n## Claim 5: SFT-free starts (sft_free + sft_free_dpo: β = 0.1, λ = 1, 3 seeds per cell)\n")
    runs = pd.concat([main, dpo], ignore_index=True)
    runs["method"] = method(runs)
    table = summary_table(runs, ["eval/accuracy", *MASS, *DELTAS], by=["method", "init"])
    table.insert(2, "accuracy before", table["init"].map(lambda i: before[i]["accuracy"]))
    print(to_markdown(table))
    for (name, init), cell in runs.groupby(["method", "init"]):
        b = before[init]
        print(f"- {name} from {init}: accuracy below the init's {b['accuracy']:.2f} in "
              f"{count(cell['eval/accuracy'] < b['accuracy'])} runs; chosen log-prob fell in "
              f"{count(cell['eval/chosen_logp_delta'] < 0)}; off-target mass above the init's "
              f"{b['eval/mass_other'] + b['eval/mass_malformed']:.3f} in "
              f"{count(cell['eval/off_target'] > b['eval/mass_other'] + b['eval/mass_malformed'])}")

    # one_step against RPO at the same weight (λ = nll_weight = 1), trial by trial.
    key = ["init", "seed"]
    one = runs[runs["method"] == "spo/one_step"].set_index(key)
    rpo = runs[runs["method"] == "rpo (dpo + nll)"].set_index(key)
    both = one.index.intersection(rpo.index)
    for metric in ("eval/accuracy", "eval/chosen_logp_delta", "eval/rejected_logp_delta", "eval/mass_correct"):
        diff = (one.loc[both, metric] - rpo.loc[both, metric]).abs()
        print(f"- one_step − RPO (weight 1), {len(both)} paired trials: |Δ {metric}| max {diff.max():.4f}, "
              f"mean {diff.mean():.4f}")

    # How often the one_step penalty was on, the α it settled on, and what it cost per step.
    history = load_experiment(root / "sft_free").history
    stats = per_trial(history, ["train/safe_region_violation", "train/spo_penalty", "train/spo_inner_step",
                                "train/tokens_per_s"]).join(main.set_index("trial_id")[["init", "seed", "spo_estimator"]])
    active = stats[stats["spo_estimator"] == "one_step"]
    print(f"- one_step penalty active in {active['train/safe_region_violation'].mean():.1%} of training steps "
          f"(per trial {active['train/safe_region_violation'].min():.0%} … "
          f"{active['train/safe_region_violation'].max():.0%}); mean penalty {active['train/spo_penalty'].mean():.4f}"
          + (f"; inner step used {active['train/spo_inner_step'].min():.4g} … "
             f"{active['train/spo_inner_step'].max():.4g} (trial means)" if "train/spo_inner_step" in active else ""))
    speed = stats.pivot_table(index=["init", "seed"], columns="spo_estimator", values="train/tokens_per_s")
    ratio = speed["reference"] / speed["one_step"]
    print(f"- cost per training step, one_step / reference (tokens/s of the same init and seed, same sweep, "
          f"{len(ratio)} pairs): mean {ratio.mean():.2f}×, range {ratio.min():.2f}× … {ratio.max():.2f}×; "
          f"tokens/s reference {speed['reference'].mean():.0f}, one_step {speed['one_step'].mean():.0f}")

    before_fix = experiment(root, "sft_free_before_fix")  # sweeps/sft_free.yaml run at 1659f94, by hand
    if before_fix is not None:
        print("\n## Claim 5: one_step before the descent check (sft_free_before_fix, α = 0.1 taken as is)\n")
        history = load_experiment(root / "sft_free_before_fix").history.dropna(subset=["train/loss"])
        dpo_history = load_experiment(root / "sft_free_dpo").history.dropna(subset=["train/loss"])
        dpo_runs = dpo[dpo["nll_weight"].fillna(0) == 0].set_index(key)
        rows = []
        for (init, seed), steps in history[history["spo_estimator"] == "one_step"].groupby(key):
            twin = dpo_history[(dpo_history["init"] == init) & (dpo_history["seed"] == seed)
                               & (dpo_history["nll_weight"].fillna(0) == 0)]
            same = steps.set_index("step")["train/loss"].equals(twin.set_index("step")["train/loss"])
            final = before_fix[(before_fix["init"] == init) & (before_fix["seed"] == seed)
                               & (before_fix["spo_estimator"] == "one_step")].iloc[0]
            rows.append({"init": init, "seed": seed,
                         "active steps": int(round(10 * steps["train/safe_region_violation"].sum())),
                         "loss identical to DPO's": same, "accuracy": final["eval/accuracy"],
                         "DPO accuracy": dpo_runs.loc[(init, seed), "eval/accuracy"],
                         "chosen Δ": final["eval/chosen_logp_delta"],
                         "DPO chosen Δ": dpo_runs.loc[(init, seed), "eval/chosen_logp_delta"]})
        print(to_markdown(pd.DataFrame(rows).round(3)))

    grid = experiment(root, "one_step")
    if grid is not None:
        print("\n## Claim 5: the one_step grid (one_step: base, seed 0, α × λ × ε)\n")
        stats = per_trial(load_experiment(root / "one_step").history,
                          ["train/safe_region_violation", "train/spo_inner_step", "train/tokens_per_s"])
        grid = grid.drop(columns=stats.columns, errors="ignore").join(stats, on="trial_id").rename(columns={"train/safe_region_violation": "active share",
                                                               "train/spo_inner_step": "α used"})
        columns = ["spo_inner_lr", "spo_lambda", "spo_epsilon", "eval/accuracy", "eval/mass_correct",
                   "eval/mass_mistake", "eval/off_target", *DELTAS, "active share", "α used", "train/tokens_per_s"]
        print(to_markdown(grid.sort_values(columns[:3])[columns].round(4)))


if __name__ == "__main__":
    main()
