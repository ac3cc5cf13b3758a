"""Peak memory of one training trial with the shared reference cache against the same trial without it.

    .venv/bin/python benchmarks/trial_memory.py [--steps 3] [--rounds 2] [setup options of vs_trl.py]

Same model, pairs and settings as `benchmarks/vs_trl.py`. Each variant runs `spo_ray.trainer.train` in a fresh
Python process and reports that process's peak resident set size (`VmHWM`), so nothing one variant
allocated can lower or raise another's figure:

  imports        the process after importing Ray Tune and Train (as a trial's actor has), torch, transformers
                 and the trainer: the floor every trial pays;
  cache-build    the first trial of a sweep: it loads the reference model, computes the tables, frees the model;
  cached         every later trial (`reference.cache: true`, tables on disk): the policy only;
  no-cache       `reference.cache: false`: the trial keeps a frozen reference model and runs it on every batch.

Every variant runs under two allocator settings:

  live           `MALLOC_MMAP_THRESHOLD_=131072`: glibc serves every block over 128 KiB (every tensor that
                 matters here) with its own mapping and unmaps it at free, so the peak RSS is the peak of the
                 memory actually in use, the same to the MiB in every round;
  glibc-default  the allocator as a trial has it: glibc raises its mmap threshold as large blocks are freed
                 and keeps freed memory in its arenas for reuse, so the peak RSS also holds memory freed
                 earlier, and varies from process to process by ±100 MiB here.

Variants run in rounds (cached and no-cache interleaved); the smallest peak of each is reported. Last line:
`peak_ratio_cached_vs_no_cache=<cached / no-cache, live> saved_mib=<no-cache − cached, live>
glibc_default_ratio=<the same ratio under glibc's defaults> live_speed_vs_glibc_default=<training tokens/s
of a cached trial, live / glibc defaults>` (the best round of each; what the live setting would cost a trial).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")

import vs_trl  # noqa: E402  (the shared set-up: tokenizer, pairs, model folders, run config)




def child(args) -> None:
    """One variant in this (fresh) process; prints its peak RSS as JSON."""
    import ray.train  # noqa: F401  what a Tune trial's actor has loaded (Ray brings pandas and pyarrow)
    import ray.tune  # noqa: F401
    import torch
    from spo_ray.trainer import train

    torch.set_num_threads(args.threads)
    seconds, step_rates = 0.0, []
    if args.variant != "imports":
        paths = json.loads(Path(args.setup).read_text())
        config = vs_trl.run_config(paths, args, cache=args.variant != "no-cache", steps=args.steps)
        start = time.perf_counter()
        train(config, cache_dir=paths["cache_dir"],
              report=lambda metrics, state: step_rates.append(metrics["train/tokens_per_s"]))
        seconds = time.perf_counter() - start
    print(json.dumps({"variant": args.variant, "peak_mib": vs_trl.vm_hwm_mib(), "seconds": seconds,
                      "tokens_per_s": statistics.median(step_rates[1:] or step_rates or [0.0])}))


ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc-default": {}}
VARIANTS = ("imports", "cache-build", "cached", "no-cache")


def measure(variant: str, setup: Path, argv: list[str], allocator: str) -> dict:
    """{"peak_mib", "seconds" (the whole `train` call), "tokens_per_s" (median training step after the first)}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATORS[allocator])
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--setup", str(setup), *argv],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vs_trl.add_setup_arguments(parser)
    parser.set_defaults(steps=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="trial_memory_"))
    paths = vs_trl.build_setup(work, args)
    argv = sys.argv[1:]  # the setup arguments again, for the children (the run config is built from them)
    low = {}
    print(f"model: Llama {args.layers} layers × hidden {args.hidden}, vocab {args.vocab}, "
          f"{int(paths['parameters']) / 1e6:.1f}M parameters (float32 weights {int(paths['parameters']) * 4 / 2**20:.0f} MiB); "
          f"batch {args.batch_size} pairs of up to {args.max_tokens} tokens, {args.steps} steps, AdamW")
    setups, runs = {}, {a: {v: [] for v in VARIANTS} for a in ALLOCATORS}
    for allocator in ALLOCATORS:
        setups[allocator] = work / f"setup-{allocator}.json"  # each allocator builds its own cache once
        setups[allocator].write_text(json.dumps({**{k: str(v) for k, v in paths.items()},
                                                 "cache_dir": str(work / f"cache-{allocator}")}))
        for variant in ("imports", "cache-build"):  # cache-build: the only cold cache
            runs[allocator][variant].append(measure(variant, setups[allocator], argv, allocator))
    for _ in range(args.rounds):  # interleaved, so that the times compare too
        for variant in ("cached", "no-cache"):
            for allocator in ALLOCATORS:
                runs[allocator][variant].append(measure(variant, setups[allocator], argv, allocator))
    low, fastest = {}, {}
    for allocator, by_variant in runs.items():
        low[allocator] = {k: min(r["peak_mib"] for r in v) for k, v in by_variant.items()}
        fastest[allocator] = {k: max(r["tokens_per_s"] for r in v) for k, v in by_variant.items()}
        print(f"{allocator}: peak RSS per fresh process (MiB; every round: " +
              "; ".join(k + " " + ", ".join(f"{r['peak_mib']:.0f}" for r in v) for k, v in by_variant.items()) + ")")
        for name, value in low[allocator].items():
            extra = "" if name == "imports" else (
                f"   ({value - low[allocator]['imports']:.0f} MiB above the imports; training "
                f"{fastest[allocator][name]:.0f} tokens/s; train() "
                + ", ".join(f"{r['seconds']:.1f}" for r in by_variant[name]) + " s)")
            print(f"  {name:12s} {value:7.0f}{extra}")
    live, default = low["live"], low["glibc-default"]
    print(f"peak_ratio_cached_vs_no_cache={live['cached'] / live['no-cache']:.3f} "
          f"saved_mib={live['no-cache'] - live['cached']:.0f} "
          f"glibc_default_ratio={default['cached'] / default['no-cache']:.3f} "
          f"live_speed_vs_glibc_default={fastest['live']['cached'] / fastest['glibc-default']['cached']:.3f}")

if __name__ == "__main__":
    main()
