"""The tables of docs/results.md's "Self-training in rounds on a real model", from the experiments that made them.

    python scripts/arith_rounds.py [ROOT]     # ROOT: the storage path the sweeps ran with (default results)

Reads ROOT/arith-rounds (DPO, SPO), -simpo and -rpo, each written by `python -m spo_ray.sweep
sweeps/arith_smollm2_rounds.yaml` (`bash scripts/arith_rounds.sh` runs all three), and prints, per method and
round (round 0: the init, step 0): greedy accuracy on the 200 held-out questions with its change since round 0
and that change's 95% bootstrap interval over seeds and questions (`analysis.tables.per_round`, as the report's
per-round table); the held-out chosen/rejected log-prob change within the round (the reference is the round's
start) and the chosen one since the init; the round's own samples (share right, prompts with a pair, pairs);
the share of greedy replies that ended; retention (per-token log-prob of GSM8K solutions) since the init. Then
method − method accuracy differences per round on the same seeds and questions, and one row per trial and round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import load_experiment  # noqa: E402
from analysis.tables import per_round, round_differences, round_ends  # noqa: E402

EXPERIMENTS = {"arith-rounds": None, "arith-rounds-simpo": None, "arith-rounds-rpo": "rpo"}
COMPARISONS = [("spo", "dpo"), ("rpo", "dpo"), ("spo", "rpo"), ("simpo", "dpo")]


def load(root: Path) -> pd.DataFrame:
    frames = []
    for name, method in EXPERIMENTS.items():
        if not (root / name / "results.csv").exists():
            print(f"_{name}: not run_\n")
            continue
        exp = load_experiment(root / name)
        ends = round_ends(exp.results, exp.history)
        if not ends.empty:
            frames.append(ends.assign(method=method or ends["loss"],
                                      wall=[trial_seconds(root / name, t) for t in ends["trial_id"]]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def trial_seconds(directory: Path, trial_id: str) -> float:
    """The trial's time in Tune (`time_total_s` of its last result: sampling, reference passes and every
    round's evaluation included), from its folder in the experiment."""
    for folder in directory.glob(f"run_trial_{trial_id}_*"):
        lines = (folder / "result.json").read_text().strip().splitlines()
        if lines:
            return float(json.loads(lines[-1])["time_total_s"])
    return float("nan")


def cell(row: pd.Series, column: str, signed: bool = True, decimals: int = 2) -> str:
    mean, std = row.get(f"{column} mean"), row.get(f"{column} std")
    if mean is None or pd.isna(mean):
        return ""
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    return text + (f" ± {std:.{decimals}f}" if std is not None and not pd.isna(std) else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default="results")
    ends = load(Path(parser.parse_args().root))
    if ends.empty:
        return
    table = per_round(ends, by=["method"])
    order = {m: i for i, m in enumerate(["dpo", "spo", "rpo", "simpo"])}
    table = table.sort_values(["method", "round"], key=lambda c: c.map(order) if c.name == "method" else c)
    print("| method | round | n | accuracy | change since round 0 [95% CI] | chosen Δ in the round | rejected Δ in "
          "the round | chosen since init | round's samples right | prompts with a pair | pairs | replies ended "
          "| retention since init |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for _, row in table.iterrows():
        change = (f"{row['change mean']:+.3f} [{row['ci low']:+.3f}, {row['ci high']:+.3f}]"
                  if "change mean" in row and not pd.isna(row["change mean"]) else "")
        in_round = row["round"] > 0
        print(f"| {row['method']} | {row['round']} | {row['n']} | {row['eval/accuracy mean']:.3f} | {change} "
              f"| {cell(row, 'chosen Δ') if in_round else ''} | {cell(row, 'rejected Δ') if in_round else ''} "
              f"| {cell(row, 'chosen from init')} | {cell(row, 'samples right', False, 3)} "
              f"| {cell(row, 'prompts with a pair', False)} | {cell(row, 'pairs', False, 0)} "
              f"| {cell(row, 'ended', False)} | {cell(row, 'retention from init', decimals=3)} |")
    print("\n| comparison | round | seeds | accuracy difference [95% CI] |")
    print("| --- | --- | --- | --- |")
    for treatment, control in COMPARISONS:
        for _, row in round_differences(ends, treatment, control, label="method").iterrows():
            if row["round"] > 0:
                print(f"| {treatment} − {control} | {int(row['round'])} | {int(row['n_pairs'])} | {row['diff mean']:+.3f} "
                      f"[{row['ci low']:+.3f}, {row['ci high']:+.3f}] |")
    print("\n| method | seed | accuracy by round | chosen Δ by round | samples right by round | trial wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (method, seed), runs in ends.sort_values("round").groupby(["method", "seed"], sort=True):
        later = runs[runs["round"] > 0]
        print(f"| {method} | {seed} | {' → '.join(f'{v:.3f}' for v in runs['eval/accuracy'])} "
              f"| {', '.join(f'{v:+.2f}' for v in later['chosen Δ'])} "
              f"| {', '.join(f'{v:.3f}' for v in later['samples right'])} | {runs['wall'].iloc[0] / 60:.1f} min |")


if __name__ == "__main__":
    main()
