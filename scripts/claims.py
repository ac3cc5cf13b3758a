"""The counts behind each claim statement of docs/results.md, from the experiments `scripts/results.sh` writes.

    .venv/bin/python scripts/claims.py [RESULTS_DIR]      # default: results

Reads results.csv of results/{beta,beta_wide,lambda,init,baselines,rpo} (finished trials only, through
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
    for init in ("base", "sft_short", "sft_long"):
        before[init] = init_evaluation(root, "init" if (root / "init").exists() else "beta", init)
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


if __name__ == "__main__":
    main()
