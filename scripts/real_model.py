"""The table of docs/results.md's "On a real pretrained model", from the experiments that produced it.

    python scripts/real_model.py [ROOT]     # ROOT: the storage path the sweeps ran with (default results)

Reads ROOT/gsm8k-smollm2 (DPO and SPO), ROOT/gsm8k-smollm2-simpo (SimPO at its paper's β 2, γ 1) and
ROOT/gsm8k-smollm2-simpo-beta01 (SimPO at DPO's β 0.1, γ 0.05), each written by `python -m spo_ray.sweep
sweeps/gsm8k_smollm2.yaml` (the file's header has the commands), and prints one Markdown row per trial.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.collect import load_experiment  # noqa: E402

EXPERIMENTS = {"gsm8k-smollm2": "", "gsm8k-smollm2-simpo": " (β 2, γ 1)",
               "gsm8k-smollm2-simpo-beta01": " (β 0.1, γ 0.05)"}
# The init's retention (per-token log-prob of the 16 held-out train.jsonl solutions), from
# `spo_ray.tasks.evaluate_init` with the sweep's settings: the baseline each run's retention is compared to.
INIT_RETENTION = -1.3615
WINDOWS = ((1, 8), (9, 16), (17, 24))
EVAL_QUESTIONS = 16  # the sweep's data.eval_questions: accuracy × this = questions answered


def window_means(history, trial_id: str, column: str) -> list[float]:
    """The mean of `column` over the logged rows of each window of steps (a row is its 4 steps' mean)."""
    rows = history[history["trial_id"] == trial_id].dropna(subset=[column])
    return [rows[(rows["step"] >= lo) & (rows["step"] <= hi)][column].mean() for lo, hi in WINDOWS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default="results")
    root = Path(parser.parse_args().root)
    print("| loss | seed | held-out chosen Δ | held-out rejected Δ | reward accuracy | retention (Δ vs init) "
          "| GSM8K accuracy (flexible) | train chosen Δ, steps 1–8 / 9–16 / 17–24 | trial wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, label in EXPERIMENTS.items():
        if not (root / name / "results.csv").exists():
            print(f"| _{name}: not run_ | | | | | | | | |")
            continue
        exp = load_experiment(root / name)
        for row in exp.results.sort_values(["loss", "seed"]).to_dict("records"):
            train = " / ".join(f"{v:+.2f}" for v in window_means(exp.history, row["trial_id"],
                                                                 "train/chosen_logp_delta"))
            retention = row["eval/retention_logp"]
            print(f"| {row['loss']}{label} | {row['seed']} | {row['eval/chosen_logp_delta']:+.2f} "
                  f"| {row['eval/rejected_logp_delta']:+.2f} | {row['eval/reward_accuracy']:.2f} "
                  f"| {retention:.4f} ({retention - INIT_RETENTION:+.3f}) "
                  f"| {round(row['eval/accuracy'] * EVAL_QUESTIONS)}/{EVAL_QUESTIONS} "
                  f"({round(row['eval/accuracy_flexible'] * EVAL_QUESTIONS)}/{EVAL_QUESTIONS}) | {train} "
                  f"| {row['wall_time_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
