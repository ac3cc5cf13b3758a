"""AdamW's step on a real model's parameters: `train.optim: adamw_torch_fused` (what auto is where memory
allows) against `adamw_torch` (torch's per-tensor loop on a CPU, the trainer's optimizer before it) and, where
bitsandbytes is installed, `adamw_bnb_8bit` (8-bit moments: the memory they save, the time they cost).

    .venv/bin/python benchmarks/optimizer.py            # ~1 minute
    .venv/bin/python benchmarks/optimizer.py --steps 10 --rounds 3

The parameters are SmolLM2-135M-Instruct's shapes (a config-made Llama: 30 layers, hidden 576, MLP 1536, tied
embeddings, vocabulary 49,152; 134.5M float32 parameters; no weights needed), with random gradients. Each
variant runs in a fresh process, alternating (loop, fused, loop, fused, …): the trainer's own optimizer
(`spo_ray.trainer.build_optimizer`) takes one step to create its moments, then `--steps` timed steps of what the
trainer does between backward and the next batch (`clip_grad_norm_` at 1.0, `step`, `zero_grad` is left out
because the gradients are kept). Reported: seconds a step (best round) and the step's own memory, the peak RSS
(`VmHWM`) above the RSS before the timed steps — what the optimizer allocates on top of weights, gradients and
moments — and the optimizer state's memory, the RSS its first step added. Last lines: `optimizer
fused_speedup=… loop_temporary_mib=… fused_temporary_mib=…`, then `optimizer_8bit slowdown_vs_fused=…
state_mib_fused=… state_mib_8bit=…` (what `spo_ray.memory.LEVER_ORDER` rests on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def status_mib(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key))
    return int(line.split()[1]) // 1024


def one_variant(optim: str, steps: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spo_ray.config import TrainConfig
    from spo_ray.trainer import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         tie_word_embeddings=True))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    start_state = status_mib("VmRSS")
    optimizer = build_optimizer(params, TrainConfig(optim=optim, learning_rate=1e-6))
    optimizer.step()  # creates the moments
    before = status_mib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "temporary_mib": status_mib("VmHWM") - before, "state_mib": before - start_state,
            "parameters": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.steps, args.threads)))
        return
    from spo_ray.optimizers import EIGHT_BIT, eight_bit_installed

    results: dict[str, list[dict]] = {"adamw_torch": [], "adamw_torch_fused": []}
    if eight_bit_installed():
        results[EIGHT_BIT] = []
    for round_ in range(args.rounds):
        for optim in results:
            out = subprocess.run([sys.executable, __file__, "--variant", optim, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            results[optim].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {optim}: {results[optim][-1]}", flush=True)
    best = {optim: min(r["seconds"] for r in runs) for optim, runs in results.items()}
    temporary = {optim: max(r["temporary_mib"] for r in runs) for optim, runs in results.items()}
    print(f"\n{results['adamw_torch'][0]['parameters'] / 1e6:.1f}M float32 parameters, {args.threads} threads, "
          f"clip + step, best of {args.rounds} rounds × {args.steps} steps")
    state = {optim: min(r["state_mib"] for r in runs) for optim, runs in results.items()}
    print("| train.optim | s a step | step's own memory (peak RSS above the step's start) | its state (RSS the first step added) |")
    print("| --- | --- | --- | --- |")
    for optim in results:
        print(f"| {optim} | {best[optim]:.3f} | {temporary[optim]} MiB | {state[optim]} MiB |")
    print(f"optimizer fused_speedup={best['adamw_torch'] / best['adamw_torch_fused']:.2f} "
          f"loop_temporary_mib={temporary['adamw_torch']} fused_temporary_mib={temporary['adamw_torch_fused']}")
    if EIGHT_BIT in results:
        print(f"optimizer_8bit slowdown_vs_fused={best[EIGHT_BIT] / best['adamw_torch_fused']:.2f} "
              f"state_mib_fused={state['adamw_torch_fused']} state_mib_8bit={state[EIGHT_BIT]}")


if __name__ == "__main__":
    main()
