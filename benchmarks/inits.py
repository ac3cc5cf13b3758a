"""Build (or reuse) the built-in initializations and measure each: greedy accuracy and answer-mass split.

    python benchmarks/inits.py [--cache-dir results/.cache] [--threads 2] [--eval-problems 200]

Uses the same init cache as the sweeps (results/.cache by default), so a build here is reused by them; the
build time printed is 0 for an init already cached. Evaluation: the task's 200 held-out problems by
default; `--eval-problems 100` evaluates the 100 the sweeps in sweeps/ use (data.arithmetic.eval_problems),
i.e. every trial's starting point on its own evaluation set.
"""

import argparse
import json
import time

import torch

from spo_ray.config import RunConfig
from spo_ray.models import INIT_NAMES, build_arithmetic_init, load_init
from spo_ray.tasks import arithmetic_config, builtin_model_kwargs
from spo_ray.tasks.arithmetic import eval_problems
from spo_ray.tasks.evaluation import evaluate_task


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default="results/.cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-problems", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The defaults every sweep uses unless it changes the task or model (eval_problems is not in the init key).
    config = RunConfig(data={"arithmetic": {"eval_problems": args.eval_problems}})
    task_cfg, model_kwargs = arithmetic_config(config), builtin_model_kwargs(config)
    problems = eval_problems(task_cfg)
    print(f"| init | build (s) | greedy accuracy | mass correct | mass mistake | mass other | mass malformed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in INIT_NAMES:
        start = time.perf_counter()
        path = build_arithmetic_init(name, task_cfg, model_kwargs, args.cache_dir, progress=False)
        built = time.perf_counter() - start
        model, tokenizer = load_init(path)
        m = evaluate_task(model, tokenizer, problems, task_cfg)
        info = json.loads((path / "init.json").read_text())
        print(f"| {name} ({info['steps']} steps) | {built:.0f} (trained in {info['train_seconds']}) | "
              f"{m['accuracy']:.3f} | {m['mass_correct']:.3f} | {m['mass_mistake']:.3f} | {m['mass_other']:.3f} | "
              f"{m['mass_malformed']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
