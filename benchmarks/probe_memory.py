"""What the end-of-run gradient probe holds, and what releasing freed memory between phases costs the next step.

    .venv/bin/python benchmarks/probe_memory.py                # ~4 minutes
    .venv/bin/python benchmarks/probe_memory.py --budgets 0 600 1200 --no-checkpointing

Part 1, the probe (`spo_ray.trainer.gradient_terms`) on SmolLM2-135M-Instruct's shape (a config-made Llama: 30
layers, hidden 576, MLP 1536, vocabulary 49,152, tied embeddings; 134.5M float32 parameters, random weights:
memory depends on shapes only), `--pairs` 8 pairs as 16 rows of `--width` 300 tokens (`--prompt` 90 of them
prompt), activation checkpointing on (the case where the probe sets a trial's peak, docs/benchmarks.md part 3),
one fresh process per token budget (`--budgets`, 0: one group, the default `train.eval_batch_tokens` is above
the probe's tokens). Each runs under `MALLOC_MMAP_THRESHOLD_=131072` — glibc returns every block over 128 KiB at
free — so the peak RSS above the probe's start is the memory it really has in use, next to one float32 gradient
of the model (what the probe holds by design).

Part 2, the release (`spo_ray.memory.release_freed_memory`, before the probe and the evaluation): in a fresh
process at glibc's defaults, `--touch-gib` 4.5 GiB (a training step's activations at part 3's defaults) are
allocated and written in 1 MiB blocks pinned in place (after a 16 MiB block is freed, as a trainer's are:
glibc's dynamic mmap threshold then serves such blocks from its heap), freed, then allocated and written once
more — with and without the release in between. The difference is what the next training step pays once per
evaluation.

Last line: `probe_memory rise_mib=… (one per budget) gradient_mib=… retouch_s_released=… retouch_s_kept=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from logprob_memory import smollm2_shape  # noqa: E402
from vs_trl import reset_peak_rss, vm_hwm_mib, vm_rss_mib  # noqa: E402


def probe_rise(args, budget: int) -> dict:
    from spo_ray.trainer import gradient_terms

    torch.set_num_threads(args.threads)
    model = smollm2_shape(49152)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    rows = 2 * args.pairs
    response = torch.zeros(rows, args.width, dtype=torch.long)
    response[:, args.prompt:] = 1
    batch = {"input_ids": torch.randint(3, 49152, (rows, args.width), generator=g),
             "attention_mask": torch.ones(rows, args.width, dtype=torch.long), "response_mask": response}
    start = vm_rss_mib()
    reset_peak_rss()
    began = time.perf_counter()
    gradient_terms(model, batch, budget or None)
    return {"rise_mib": vm_hwm_mib() - start, "seconds": time.perf_counter() - began,
            "gradient_mib": sum(p.numel() * 4 for p in model.parameters()) / 2**20}


def retouch(args, release: bool) -> dict:
    from spo_ray.memory import release_freed_memory

    warm = torch.ones(2**22)  # a 16 MiB block, freed: glibc's dynamic mmap threshold rises to it, as in a trainer
    del warm
    blocks, pins = [], []
    for _ in range(int(args.touch_gib * 1024)):
        blocks.append(torch.ones(2**18))  # 1 MiB, written
        pins.append(torch.ones(2**12))
    del blocks
    released = release_freed_memory() if release else False
    after_free = vm_rss_mib()
    began = time.perf_counter()
    blocks = [torch.ones(2**18) for _ in range(int(args.touch_gib * 1024))]
    return {"seconds": time.perf_counter() - began, "rss_after_free_mib": after_free, "released": released}


def fresh(args, *extra: str, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--threads", str(args.threads), "--pairs", str(args.pairs), "--width",
               str(args.width), "--prompt", str(args.prompt), "--touch-gib", str(args.touch_gib),
               *(["--no-checkpointing"] if not args.checkpointing else []), *extra]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 600])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--prompt", type=int, default=90)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--touch-gib", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe-budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--retouch", choices=("released", "kept"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_budget is not None:
        print(json.dumps(probe_rise(args, args.probe_budget)))
        return
    if args.retouch:
        print(json.dumps(retouch(args, args.retouch == "released")))
        return
    live = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    print(f"probe: {args.pairs} pairs as {2 * args.pairs} rows of {args.width} tokens, SmolLM2-135M's shape, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {args.threads} threads; live memory")
    rises = {}
    for budget in args.budgets:
        result = fresh(args, "--probe-budget", str(budget), env=live)
        rises[budget] = result["rise_mib"]
        print(f"  token budget {budget or 'none (one group)'}: rises {result['rise_mib']:,.0f} MiB in "
              f"{result['seconds']:.0f} s (one float32 gradient: {result['gradient_mib']:,.0f} MiB)", flush=True)
    touches = {}
    for mode in ("kept", "released"):
        touches[mode] = fresh(args, "--retouch", mode)
        print(f"  {args.touch_gib} GiB freed, then allocated and written again, memory {mode} in between: "
              f"{touches[mode]['seconds']:.2f} s (RSS after the free {touches[mode]['rss_after_free_mib']:,.0f} "
              f"MiB)", flush=True)
    print("probe_memory rise_mib=" + ",".join(f"{r:.0f}" for r in rises.values()) +
          f" gradient_mib={result['gradient_mib']:.0f} retouch_s_released={touches['released']['seconds']:.2f}"
          f" retouch_s_kept={touches['kept']['seconds']:.2f}")


if __name__ == "__main__":
    main()
