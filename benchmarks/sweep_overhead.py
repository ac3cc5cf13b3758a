"""What a Ray trial costs on top of the training it runs: path (a) in-process Tune trials vs path (b) Ray Train.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 4] [--steps 6] [--out DIR]

Runs the same N tiny trainings (a from-scratch 2-layer model, a few steps) three ways, one at a time so the
numbers compare like for like:

  in-process   N × `trainer.train` in this process (the floor: no Ray at all);
  path (a)     a Tune sweep whose trials call the trainer inside the trial actor;
  path (b)     the same sweep with `scaling.force_ray_train`: each trial drives a 1-worker TorchTrainer.

and prints the seconds per trial each Ray path adds over the in-process runs (Ray's own start-up, paid once
per sweep, is reported separately).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_sweep(storage: str, trials: int, steps: int) -> dict:
    return {
        "name": "overhead", "storage_path": storage,
        "loss": {"name": "dpo", "beta": 0.1},
        "model": {"init": "scratch", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "data": {"arithmetic": {"train_pairs": 128, "eval_pairs": 32, "eval_problems": 16,
                                "pretrain_examples": 2000, "sft_examples": 1000}},
        "train": {"seed": {"grid": list(range(trials))}, "max_steps": steps, "batch_size": 16,
                  "eval_every": steps, "probe_every": steps, "log_every": steps, "warmup_steps": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {"max_concurrent_trials": 1},
        "wandb": {"mode": "disabled"},
    }


def in_process(raw: dict, trials: int) -> float:
    from spo_ray.config import validate_run
    from spo_ray.distributed import init_cache_dir, reference_cache_dir
    from spo_ray.trainer import WorkerContext, train

    def run(seed: int) -> None:
        point = copy.deepcopy(raw)
        point["train"]["seed"] = seed
        sweep = validate_run(point)
        train(sweep.run_config(), cache_dir=init_cache_dir(sweep), reference_dir=reference_cache_dir(sweep),
              context=WorkerContext(cpus=1), report=lambda metrics, state: None)

    run(0)  # warm-up: imports, tokenizer, reference tables (a sweep shares these too)
    start = time.perf_counter()
    for seed in range(trials):
        run(seed)
    return time.perf_counter() - start


def through_tune(raw: dict, name: str, force_ray_train: bool) -> float:
    from spo_ray.sweep import build_tuner, resolve

    raw = copy.deepcopy(raw)
    raw["scaling"]["force_ray_train"] = force_ray_train
    args = argparse.Namespace(overrides=[], storage_path=None, name=name)
    raw, sweep, spaces = resolve(raw, args)
    from spo_ray.distributed import experiment_dir
    tuner = build_tuner(raw, sweep, spaces, experiment_dir(sweep), resume=False)
    start = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None, help="storage path (default: a temporary folder)")
    args = parser.parse_args()
    storage = args.out or tempfile.mkdtemp(prefix="sweep_overhead_")
    raw = tiny_sweep(storage, args.trials, args.steps)

    baseline = in_process(raw, args.trials)
    from spo_ray.sweep import start_ray
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    start = time.perf_counter()
    start_ray()
    ray_start = time.perf_counter() - start
    path_a = through_tune(raw, "path_a", force_ray_train=False)
    path_b = through_tune(raw, "path_b", force_ray_train=True)

    n = args.trials
    print(f"\n{n} trials of {args.steps} steps, one at a time, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  ray.init (once per sweep):        {ray_start:6.1f} s")
    print(f"  in-process trainer.train:         {baseline:6.1f} s  ({baseline / n:5.1f} s/trial)")
    print(f"  path (a) Tune trial, in-process:  {path_a:6.1f} s  ({path_a / n:5.1f} s/trial, "
          f"overhead {(path_a - baseline) / n:5.1f} s/trial)")
    print(f"  path (b) Tune + Ray Train:        {path_b:6.1f} s  ({path_b / n:5.1f} s/trial, "
          f"overhead {(path_b - baseline) / n:5.1f} s/trial)")


if __name__ == "__main__":
    main()
