"""GPU training throughput of one preference step on a config-created ~0.5B-parameter Llama.

    python benchmarks/gpu_throughput.py            # on an NVIDIA GPU (scripts/gpu_check.sh runs it)

Two variants, interleaved in the same process so their ratio is fair:
  cached  — spo-ray's path: reference log-probs looked up from the shared cache; one policy forward and
            backward over the concatenated chosen+rejected batch (bf16 autocast, SDPA attention, fused AdamW);
  on_the_fly — the same step plus a frozen reference model's forward on every batch (TRL's default).
Prints tokens/s, model FLOPs utilisation (MFU: 6·N·tokens + attention FLOPs over the GPU's dense bf16 peak)
and peak memory of each, and a line `gpu=<name> cached_tokens_per_s=… mfu=… speedup_vs_on_the_fly=…`.

Then real vocabularies (`--vocabs`, default 49,152 and 151,936, on SmolLM2-135M's body: 30 layers, hidden 576,
MLP 1536, 9/3 heads, tied): one training step of `--vocab-pairs` pairs × 2 × `--vocab-seq-len` tokens (half
prompt, half response) through spo-ray's chunked LM head against the full-logits path
(`spo_ray.logprobs.full_logits_sequence_logps`, the path before it), interleaved: tokens/s and peak memory of
each, and a line per vocabulary `vocab=… chunked_tokens_per_s=… full_tokens_per_s=… chunked_peak_gib=…
full_peak_gib=…`.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spo_ray.logprobs as logprobs
from spo_ray.logprobs import concatenated_forward
from spo_ray.losses import preference_loss

# Dense bf16 peak FLOP/s from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def model_config(seq_len: int) -> LlamaConfig:
    # 24 layers × hidden 1024 × MLP 4096, vocab 32k, untied: ≈0.47B parameters.
    return LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, intermediate_size=4096, max_position_embeddings=seq_len,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def make_batch(pairs: int, seq_len: int, vocab: int, device) -> dict:
    prompt = seq_len // 2
    ids = torch.randint(3, vocab, (2 * pairs, seq_len), device=device)
    response_mask = torch.zeros_like(ids)
    response_mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response_mask,
            "index": torch.arange(pairs, device=device)}


def vocabulary_part(args, device) -> None:
    """Chunked LM head against full logits on SmolLM2-135M's body at real vocabularies (module docstring)."""
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=args.vocab_layers, num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=args.vocab_seq_len, tie_word_embeddings=True,
                             attn_implementation="sdpa")
        policy = LlamaForCausalLM(config).to(device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=device.type == "cuda")
        batch = make_batch(args.vocab_pairs, args.vocab_seq_len, vocab, device)
        reference = {k: torch.zeros(args.vocab_pairs, device=device) for k in ("chosen_logps", "rejected_logps")}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                out = concatenated_forward(policy, batch)
                losses, _ = preference_loss("dpo", out["chosen_logps"], out["rejected_logps"],
                                            reference["chosen_logps"], reference["rejected_logps"], beta=0.1)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rates, peaks = {"chunked": [], "full": []}, {}
        for round_ in range(args.rounds + 1):  # round 0 warms both up
            for label in ("chunked", "full"):
                with logprobs.full_logits_only() if label == "full" else nullcontext():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    for _ in range(args.vocab_steps):
                        step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        peaks[label] = torch.cuda.max_memory_allocated() / 2**30
                    if round_:
                        rates[label].append(args.vocab_steps * batch["input_ids"].numel() / (time.perf_counter() - start))
        chunked, full = max(rates["chunked"]), max(rates["full"])
        print(f"vocab {vocab:,}: {args.vocab_pairs} pairs × 2 × {args.vocab_seq_len} tokens, {args.vocab_layers} "
              f"layers; chunked {chunked:,.0f} tokens/s, peak {peaks.get('chunked', float('nan')):.2f} GiB; full "
              f"logits {full:,.0f} tokens/s, peak {peaks.get('full', float('nan')):.2f} GiB")
        print(f"vocab={vocab} chunked_tokens_per_s={chunked:.0f} full_tokens_per_s={full:.0f} "
              f"chunked_peak_gib={peaks.get('chunked', float('nan')):.2f} full_peak_gib={peaks.get('full', float('nan')):.2f}")
        del policy, optimizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocabs", default="49152,151936")
    parser.add_argument("--vocab-pairs", type=int, default=8)
    parser.add_argument("--vocab-seq-len", type=int, default=512)
    parser.add_argument("--vocab-layers", type=int, default=30)
    parser.add_argument("--vocab-steps", type=int, default=5)
    parser.add_argument("--only-vocabularies", action="store_true", help="skip the 0.47B part (a CPU smoke test)")
    args = parser.parse_args()
    if args.only_vocabularies:
        return vocabulary_part(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(0)
    cfg = model_config(args.seq_len)
    policy = LlamaForCausalLM(cfg).to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)
    batch = make_batch(args.pairs, args.seq_len, cfg.vocab_size, device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cached = concatenated_forward(reference, batch)
    tokens_per_step = batch["input_ids"].numel()
    # Training FLOPs per token: 6N for the weights, plus attention's 6·2·L·T·h (QKᵀ and AV, fwd+bwd).
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * args.seq_len * cfg.hidden_size
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)

    def step(on_the_fly: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = concatenated_forward(policy, batch)
            if on_the_fly:
                with torch.no_grad():
                    ref = concatenated_forward(reference, batch)
            else:
                ref = cached
            losses, _ = preference_loss("spo", out["chosen_logps"], out["rejected_logps"],
                                        ref["chosen_logps"], ref["rejected_logps"], beta=0.1, spo_lambda=1.0)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for variant in (False, True):  # warm-up: kernels, allocator, fused AdamW state
        for _ in range(3):
            step(variant)
    results = {"cached": [], "on_the_fly": []}
    memory = {}
    for _ in range(args.rounds):
        for label, on_the_fly in (("cached", False), ("on_the_fly", True)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(on_the_fly)
            torch.cuda.synchronize()
            results[label].append(args.steps * tokens_per_step / (time.perf_counter() - start))
            memory[label] = torch.cuda.max_memory_allocated() / 2**30
    print(f"device: {name}; torch {torch.__version__}; model {n_params / 1e9:.3f}B params; "
          f"{args.pairs} pairs × 2 × {args.seq_len} tokens per step; bf16 autocast, SDPA, fused AdamW")
    summary = {}
    for label, values in results.items():
        best = max(values)
        mfu = best * flops_per_token / peak if peak else float("nan")
        summary[label] = (best, mfu)
        print(f"{label:>10}: tokens/s {best:,.0f} (rounds: {', '.join(f'{v:,.0f}' for v in values)}); "
              f"MFU {mfu:.1%}; peak memory {memory[label]:.1f} GiB")
    speedup = summary["cached"][0] / summary["on_the_fly"][0]
    print(f"gpu={name.replace(' ', '_')} cached_tokens_per_s={summary['cached'][0]:.0f} "
          f"mfu={summary['cached'][1]:.3f} speedup_vs_on_the_fly={speedup:.3f}")
    del policy, reference, optimizer
    torch.cuda.empty_cache()
    vocabulary_part(args, device)


if __name__ == "__main__":
    main()
