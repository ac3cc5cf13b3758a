"""Two runs of the same experiments, trial by trial: how far each loss's final metrics moved between them.

    .venv/bin/python scripts/compare_runs.py OLD_RESULTS NEW_RESULTS [--experiments beta beta_wide ...]

OLD_RESULTS and NEW_RESULTS are folders that `scripts/results.sh` filled (results/<experiment>/results.csv),
e.g. the same sweeps at two commits. Trials are matched on their parameter columns (loss, β, λ, init, seed, …);
`lambda`'s λ = 0 trials count as DPO and `rpo`'s as RPO. Prints, per loss: trials, trials with the same
accuracy, the largest and mean accuracy change, the largest change of the chosen log-prob delta, and the
largest change of any eval/ metric (docs/results.md "How fragile DPO's numbers are").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.tables import to_markdown  # noqa: E402

EXPERIMENTS = ["beta", "beta_wide", "lambda", "init", "baselines", "rpo"]
NOT_PARAMETERS = ("trial_id", "status", "error", "step", "wall_time_s")


def matched(old: Path, new: Path, experiment: str) -> pd.DataFrame:
    before, after = (pd.read_csv(root / experiment / "results.csv") for root in (old, new))
    parameters = [c for c in before.columns
                  if c not in NOT_PARAMETERS and not c.startswith(("eval/", "train/", "probe/"))]
    both = before.merge(after, on=parameters, suffixes=("_old", "_new"), validate="one_to_one")
    if len(both) != len(before) or len(both) != len(after):
        raise SystemExit(f"{experiment}: the two runs' trials do not match one to one")
    if experiment == "lambda":
        both["group"] = both["spo_lambda"].map(lambda value: "spo" if value > 0 else "dpo")
    else:
        both["group"] = "rpo" if experiment == "rpo" else both["loss"]
    return both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    args = parser.parse_args()
    both = pd.concat([matched(args.old, args.new, e) for e in args.experiments
                      if (args.old / e / "results.csv").exists() and (args.new / e / "results.csv").exists()])
    metrics = [c.removesuffix("_old") for c in both.columns if c.startswith("eval/") and c.endswith("_old")]
    change = {m: (both[f"{m}_new"] - both[f"{m}_old"]).abs() for m in metrics}
    both = both.assign(accuracy_change=change["eval/accuracy"], chosen_change=change["eval/chosen_logp_delta"],
                       any_change=pd.concat(change, axis=1).max(axis=1))
    table = both.groupby("group").agg(trials=("accuracy_change", "size"),
                                      same_accuracy=("accuracy_change", lambda x: int((x == 0).sum())),
                                      accuracy_change_max=("accuracy_change", "max"),
                                      accuracy_change_mean=("accuracy_change", "mean"),
                                      chosen_logp_change_max=("chosen_change", "max"),
                                      any_eval_change_max=("any_change", "max"))
    print(to_markdown(table.reset_index()))


if __name__ == "__main__":
    main()
