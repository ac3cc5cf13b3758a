"""Peak memory per worker of a 2-worker trial under DDP against the same trial under FSDP.

    .venv/bin/python benchmarks/fsdp_memory.py [--steps 3] [setup options of vs_trl.py]

Same model, pairs and settings as `benchmarks/vs_trl.py` (a 30.4M-parameter Llama, float32, AdamW), global
batch 8 = 4 pairs per worker, reference log-probs from the shared cache (built first, in this process). Each
strategy runs `spo_ray.trainer.train` on two gloo workers (`torch.multiprocessing`, no Ray: the trainer is the
same one a Ray Train worker runs), and each worker reports its peak resident set size (`VmHWM`). Workers start with
`MALLOC_MMAP_THRESHOLD_=131072` (see `benchmarks/trial_memory.py`: the peak RSS is then the peak of memory in
use, reproducible to the MiB).

DDP keeps a full replica per worker: weights, gradients and AdamW's two moments, 4 × 4 bytes per parameter.
FSDP keeps 1/N of each, plus one transformer block's gathered weights at a time. Last line:
`peak_ratio_fsdp_vs_ddp=<max over workers, fsdp / ddp> saved_mib_per_worker=<ddp − fsdp>`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the spawned workers

import vs_trl  # noqa: E402  (the shared set-up: tokenizer, pairs, model folders, run config)


def worker(rank: int, world_size: int, port: int, strategy: str, args, paths: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from spo_ray.trainer import WorkerContext, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = vs_trl.run_config(paths, args, steps=args.steps)
        wrap = torch.nn.parallel.DistributedDataParallel if strategy == "ddp" else None
        train(config, cache_dir=paths["cache_dir"], report=lambda metrics, state: None, wrap_model=wrap,
              context=WorkerContext(rank=rank, world_size=world_size, strategy=strategy, cpus=1))
        peak = vs_trl.vm_hwm_mib()
        Path(out, f"{strategy}-{rank}.json").write_text(json.dumps({"peak_mib": peak}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp
    from spo_ray.trainer import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vs_trl.add_setup_arguments(parser)
    parser.set_defaults(steps=3, threads=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fsdp_memory_"))
    paths = {**vs_trl.build_setup(work, args), "cache_dir": str(work / "cache")}
    # Build the reference tables once, so both strategies read them and neither loads a reference model.
    train(vs_trl.run_config(paths, args, steps=1), cache_dir=paths["cache_dir"], report=lambda m, s: None)

    peaks = {}
    for strategy in ("ddp", "fsdp"):
        mp.spawn(worker, args=(2, free_port(), strategy, args, paths, str(work)), nprocs=2, join=True)
        peaks[strategy] = [json.loads(Path(work, f"{strategy}-{rank}.json").read_text())["peak_mib"]
                           for rank in range(2)]

    parameters = int(paths["parameters"])
    state_mib = parameters * 16 / 2**20
    print(f"model: Llama {args.layers} layers × hidden {args.hidden}, vocab {args.vocab}, {parameters / 1e6:.1f}M "
          f"parameters; weights + gradients + AdamW moments {state_mib:.0f} MiB in float32 (half of it per "
          f"worker under FSDP: {state_mib / 2:.0f} MiB); global batch {args.batch_size} pairs over 2 workers, "
          f"{args.steps} steps; torch {__import__('torch').__version__}")
    for strategy, values in peaks.items():
        print(f"  {strategy:5s} peak RSS per worker: " + ", ".join(f"rank {r} {v:.0f} MiB" for r, v in enumerate(values)))
    ddp, fsdp = max(peaks["ddp"]), max(peaks["fsdp"])
    print(f"peak_ratio_fsdp_vs_ddp={fsdp / ddp:.3f} saved_mib_per_worker={ddp - fsdp:.0f}")


if __name__ == "__main__":
    main()
