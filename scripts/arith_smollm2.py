"""The tables of docs/results.md's "Self-sampled pairs on a real model", from the experiments that made them.

    python scripts/arith_smollm2.py [ROOT]     # ROOT: the storage path the sweeps ran with (default results)

Reads ROOT/arith-smollm2 (DPO, SPO), -simpo, -rpo and -sft (DPO, SPO from the SFT-on-own-samples init), each
written by `python -m spo_ray.sweep sweeps/arith_smollm2.yaml` (`bash scripts/arith_smollm2.sh` runs all
four), and prints: the sampler's figures; per method and init, greedy accuracy on the 200 held-out questions
before (step 0) and after training with the change's 95% bootstrap interval over seeds and questions
(`analysis.tables.paired_change_interval`, as the report's before/after table), the held-out chosen/rejected log-prob deltas, the share of replies that
ended, and retention (the per-token log-prob of GSM8K solutions: after − before); then method − method
accuracy differences on the same seeds and questions; then one row per trial.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import load_experiment  # noqa: E402
from analysis.tables import paired_change_interval, start_and_end  # noqa: E402

EXPERIMENTS = {"arith-smollm2": "", "arith-smollm2-simpo": " (β 2, γ 1)", "arith-smollm2-rpo": " (RPO: DPO + NLL)",
               "arith-smollm2-sft": ""}
COMPARISONS = [("spo", "dpo", ""), ("rpo", "dpo", ""), ("spo", "rpo", ""), ("simpo", "dpo", ""),
               ("spo", "dpo", "sft")]


def method(exp_name: str, loss: str) -> str:
    return "rpo" if exp_name.endswith("-rpo") else loss


def init_of(exp_name: str) -> str:
    return "sft" if exp_name.endswith("-sft") else "init"


def load(root: Path):
    runs, sampler = [], None
    for name in EXPERIMENTS:
        if not (root / name / "results.csv").exists():
            print(f"_{name}: not run_\n")
            continue
        exp = load_experiment(root / name)
        per_run = start_and_end(exp.results, exp.history, "eval/accuracy")
        starts = exp.history[exp.history["step"] == 0].set_index("trial_id")
        for row in per_run.to_dict("records"):
            final = exp.results.set_index("trial_id").loc[row["trial_id"]]
            start = starts.loc[row["trial_id"]]
            runs.append({**row, "method": method(name, row["loss"]), "init": init_of(name),
                         "chosen": final["eval/chosen_logp_delta"], "rejected": final["eval/rejected_logp_delta"],
                         "reward_accuracy": final["eval/reward_accuracy"],
                         "ended_before": start["eval/ended_share"], "ended_after": final["eval/ended_share"],
                         "retention": final["eval/retention_logp"] - start["eval/retention_logp"],
                         "wall": final["wall_time_s"]})
        if sampler is None and "sampler/sample_accuracy" in exp.results.columns:
            sampler = exp.results.iloc[0]
    return runs, sampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default="results")
    root = Path(parser.parse_args().root)
    runs, sampler = load(root)
    if sampler is not None:
        print(f"sampler: {sampler['sampler/samples']:.0f} samples of {sampler['sampler/prompts']:.0f} training prompts, "
              f"{sampler['sampler/sample_accuracy']:.3f} right, {sampler['sampler/ended_share']:.3f} ended; prompts "
              f"with a pair {sampler['sampler/prompts_with_pair']:.3f} (with a right and a wrong sample "
              f"{sampler['sampler/prompts_right_and_wrong']:.3f}), always right "
              f"{sampler['sampler/prompts_all_correct']:.3f}, never right {sampler['sampler/prompts_none_correct']:.3f}"
              f" (gold used {sampler['sampler/gold_used']:.0f}); {sampler['sampler/pairs']:.0f} pairs built, "
              f"{sampler['sampler/eval_pairs']:.0f} held-out; {sampler['sampler/tokens_per_s']:.0f} tokens/s over "
              f"{sampler['sampler/seconds']:.0f} s\n")
    if not runs:
        return
    import pandas as pd
    frame = pd.DataFrame(runs)
    print("| method | init | n | accuracy before | after | change [95% CI] | held-out chosen Δ | rejected Δ "
          "| replies ended before → after | retention Δ |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, init), group in frame.groupby(["method", "init"], sort=False):
        changes = np.stack([a - b for a, b in zip(group["after items"], group["before items"])])
        low, high = paired_change_interval(changes)
        mean_std = lambda c: f"{group[c].mean():+.2f} ± {group[c].std(ddof=1):.2f}"
        print(f"| {name} | {init} | {len(group)} | {group['before'].mean():.3f} | {group['after'].mean():.3f} "
              f"| {group['after'].mean() - group['before'].mean():+.3f} [{low:+.3f}, {high:+.3f}] | {mean_std('chosen')} "
              f"| {mean_std('rejected')} | {group['ended_before'].mean():.2f} → {group['ended_after'].mean():.2f} "
              f"| {group['retention'].mean():+.3f} ± {group['retention'].std(ddof=1):.3f} |")
    print("\n| comparison | init | seeds | accuracy difference [95% CI] |")
    print("| --- | --- | --- | --- |")
    for treatment, control, init in COMPARISONS:
        init = init or "init"
        a = frame[(frame["method"] == treatment) & (frame["init"] == init)].set_index("seed")
        b = frame[(frame["method"] == control) & (frame["init"] == init)].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        changes = np.stack([a.loc[s, "after items"] - b.loc[s, "after items"] for s in seeds])
        low, high = paired_change_interval(changes)
        print(f"| {treatment} − {control} | {init} | {len(seeds)} | {changes.mean():+.3f} [{low:+.3f}, {high:+.3f}] |")
    sft_init = frame[frame["init"] == "sft"]["before"]
    if not sft_init.empty:
        start = frame[frame["init"] == "init"]["before"].iloc[0]
        print(f"\nthe inits: accuracy {start:.3f} (SmolLM2-135M-Instruct), {sft_init.iloc[0]:.3f} (after SFT on its own "
              f"right samples)")
    print("\n| method | init | seed | accuracy before → after | held-out chosen Δ | rejected Δ | reward accuracy "
          "| retention Δ | trial wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in frame.sort_values(["init", "method", "seed"]).to_dict("records"):
        print(f"| {row['method']} | {row['init']} | {row['seed']} | {row['before']:.3f} → {row['after']:.3f} "
              f"| {row['chosen']:+.2f} | {row['rejected']:+.2f} | {row['reward_accuracy']:.2f} "
              f"| {row['retention']:+.3f} | {row['wall'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
