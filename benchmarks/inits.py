"""Build (or reuse) the built-in initializations and measure each: greedy accuracy and answer-mass split.

    python benchmarks/inits.py [--cache-dir results/.cache] [--threads 2] [--eval-problems 200]

Uses the same init cache as the sweeps (results/.cache by default), so a build here is reused by them; the
build time printed is 0 for an init already cached. Evaluation: the task's 200 held-out problems by
default; `--eval-problems 100` evaluates the 100 the sweeps in sweeps/ use (data.arithmetic.eval_problems),
i.e. every trial's starting point on its own evaluation set, through the same `spo_ray.tasks.evaluate_init`
as scripts/claims.py.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from spo_ray.config import RunConfig
from spo_ray.tasks import evaluate_init, model_path
from spo_ray.tasks.arithmetic import INIT_NAMES


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default="results/.cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-problems", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| init | build (s) | greedy accuracy | mass correct | mass mistake | mass other | mass malformed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in INIT_NAMES:
        # The defaults every sweep uses unless it changes the task or model (eval_problems is not in the init key).
        config = RunConfig(model={"init": name}, data={"arithmetic": {"eval_problems": args.eval_problems}})
        start = time.perf_counter()
        path = Path(model_path(name, "model.init", config, args.cache_dir))
        built = time.perf_counter() - start
        _, m = evaluate_init(config, args.cache_dir)
        info = json.loads((path / "init.json").read_text())
        print(f"| {name} ({info['steps']} steps) | {built:.0f} (trained in {info['train_seconds']}) | "
              f"{m['accuracy']:.3f} | {m['mass_correct']:.3f} | {m['mass_mistake']:.3f} | {m['mass_other']:.3f} | "
              f"{m['mass_malformed']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
