"""Peak memory of the log-prob passes at real vocabularies: the chunked LM head against full logits.

    .venv/bin/python benchmarks/logprob_memory.py                 # both vocabularies, every measurement
    .venv/bin/python benchmarks/logprob_memory.py --vocabs 49152 --step-tokens 256   # a quicker look

Models (no download): config-made Llamas with SmolLM2-135M-Instruct's shape — 30 layers, hidden 576, MLP 1536,
9 attention heads over 3 KV heads, tied embeddings, float32 — with its 49,152-token vocabulary, and the same
body with Qwen2.5's 151,936. Pairs: random token ids, every pair the same length (prompt + response), so a
batch is as wide as the pass's budget allows.

Every measurement runs in a fresh process (`--one`), which builds the model, then the batch, then runs the pass
once; its figures are the peak RSS (`VmHWM`) and what the pass added to the RSS it started from (model, data
and imports already loaded). Measurements, per vocabulary:

- `reference pass`: `spo_ray.reference.compute_reference_logps` over one batch, as the pass cuts it —
  now: the default `reference.batch_tokens` (16,384 tokens: 32 pairs of 2 × 256); before: the full-logits
  path (`spo_ray.logprobs.full_logits_sequence_logps`, this commit's predecessor's only path) at 4 and 8
  pairs, and its default of 128 pairs extrapolated linearly from those two (running it would need more
  memory than this machine has at 151,936);
- `evaluation pass`: `spo_ray.trainer.evaluate_pairs` (reference from a table), the same way
  (`train.eval_batch_tokens`, default 16,384; before: `train.eval_batch_size` 128);
- `training step`: one AdamW step of 8 pairs whose rows are `--step-tokens` long (default 512), chunked and
  full logits; and the same step with the loss on the last hidden states and no LM head at all ("backbone"):
  the model, its gradients, AdamW's state and the activations without logits — the floor the chunked step
  should sit on.

Then speed (`--speed-rounds`, 3): training steps (forward, backward, AdamW) on one batch, chunked and full logits
interleaved in one process, policy tokens/s of each — on the 135M shape (4 pairs × 2 × 256 tokens) and on the
built-in task's 0.86M-parameter Llama (32 pairs of the arithmetic task's length, vocabulary 20).

The last lines: `vocab=… reference_new_mib=… reference_old_default_mib=… step_new_mib=… step_old_mib=…
step_backbone_mib=…` per vocabulary, and `speed model=… chunked_tokens_per_s=… full_tokens_per_s=… ratio=…`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PAIR_TOKENS = 256        # prompt 128 + response 128 in the passes
STEP_PAIRS = 8


def vm_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def smollm2_shape(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def dataset(pairs: int, tokens: int, vocab: int):
    from spo_ray.data import PairDataset, TokenizedPair

    g = torch.Generator().manual_seed(0)
    prompt, response = tokens // 2, tokens - tokens // 2
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    return PairDataset([TokenizedPair(ids(prompt), ids(response), ids(response)) for _ in range(pairs)])


def measure_one(kind: str, path: str, vocab: int, pairs: int, tokens: int) -> dict:
    """One measurement (see the module docstring), in this process."""
    import spo_ray.logprobs as logprobs
    from spo_ray.config import LossConfig
    from spo_ray.data import collate_pairs
    from spo_ray.reference import PrecomputedReference, compute_reference_logps
    from spo_ray.trainer import batch_loss, evaluate_pairs

    torch.set_num_threads(2)
    model = smollm2_shape(vocab)
    data = dataset(pairs, tokens, vocab)
    if path == "old":  # every pass through the full logits, as before the chunked head (a process per run)
        logprobs.full_logits_only().__enter__()
    before = vm_mib("VmRSS")
    start = time.perf_counter()
    if kind == "reference":
        model.eval()
        compute_reference_logps(model, data, 0, batch_size=pairs, max_tokens=None)  # one batch of `pairs`
    elif kind == "eval":
        zeros = {name: torch.zeros(len(data)) for name in
                 ("chosen_logps", "rejected_logps", "chosen_avg_logps", "rejected_avg_logps")}
        evaluate_pairs(model, data, PrecomputedReference(zeros), LossConfig(), 0, pairs, "cpu", nullcontext, None)
    elif kind == "step":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = collate_pairs([data[i] for i in range(len(data))], 0)
        if path == "backbone":  # the same forward and backward without the LM head
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=logprobs.position_ids_from_mask(batch["attention_mask"]),
                                 use_cache=False).last_hidden_state  # as the chunked path calls it
            loss = hidden.float().pow(2).mean()
        else:
            policy = logprobs.concatenated_forward(model, batch)
            reference = {k: v.detach() + 0.1 for k, v in policy.items()}
            loss, _ = batch_loss(LossConfig(), policy, reference, step=1)
        loss.backward()
        optimizer.step()
    else:
        raise ValueError(kind)
    return {"kind": kind, "path": path, "vocab": vocab, "pairs": pairs, "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 1), "start_mib": round(before),
            "peak_mib": round(vm_mib("VmHWM")), "added_mib": round(vm_mib("VmHWM") - before)}


def run(kind: str, path: str, vocab: int, pairs: int, tokens: int) -> dict:
    command = [sys.executable, __file__, "--one", kind, path, str(vocab), str(pairs), str(tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        killed = done.returncode < 0 or done.returncode == 137
        return {"kind": kind, "path": path, "vocab": vocab, "pairs": pairs, "tokens": tokens,
                "error": "killed (out of memory?)" if killed else done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(row: dict) -> None:
    what = f"{row['kind']:9s} {row['path']:8s} vocab {row['vocab']:>7,} {row['pairs']:>3} pairs × 2 × {row['tokens']} tokens"
    if "error" in row:
        print(f"  {what}: {row['error']}", flush=True)
    else:
        print(f"  {what}: peak {row['peak_mib']:>6,} MiB (+{row['added_mib']:,} over the {row['start_mib']:,} MiB "
              f"it started from), {row['seconds']} s", flush=True)


def speed(name: str, model, pairs: int, tokens: int, vocab: int, rounds: int, steps: int = 2) -> str:
    """Policy tokens/s of training steps through the chunked head and through full logits, interleaved."""
    import spo_ray.logprobs as logprobs
    from spo_ray.config import LossConfig
    from spo_ray.data import collate_pairs
    from spo_ray.trainer import batch_loss

    torch.set_num_threads(2)
    data = dataset(pairs, tokens, vocab)
    batch = collate_pairs([data[i] for i in range(len(data))], 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rates = {"chunked": [], "full": []}
    for round_ in range(rounds + 1):  # round 0 warms both up
        for label in rates:
            start = time.perf_counter()
            with logprobs.full_logits_only() if label == "full" else nullcontext():
                for _ in range(steps):
                    policy = logprobs.concatenated_forward(model, batch)
                    reference = {k: v.detach() + 0.1 for k, v in policy.items()}
                    loss, _ = batch_loss(LossConfig(), policy, reference, step=1)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if round_:
                rates[label].append(steps * batch["input_ids"].numel() / (time.perf_counter() - start))
    chunked, full = max(rates["chunked"]), max(rates["full"])
    print(f"  {name}: {pairs} pairs × 2 × {tokens} tokens; chunked {chunked:,.0f} tokens/s (rounds "
          f"{', '.join(f'{r:,.0f}' for r in rates['chunked'])}), full logits {full:,.0f} "
          f"({', '.join(f'{r:,.0f}' for r in rates['full'])}): ratio {chunked / full:.3f}", flush=True)
    return f"speed model={name} chunked_tokens_per_s={chunked:.0f} full_tokens_per_s={full:.0f} ratio={chunked / full:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="49152,151936")
    parser.add_argument("--step-tokens", type=int, default=512, help="row length of the training step's pairs")
    parser.add_argument("--budget", type=int, default=16384, help="the passes' default token budget")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: memory, speed")
    parser.add_argument("--multi-chunk", action="store_true",
                        help="speed on batches whose scored positions span several chunks (the recompute path)")
    parser.add_argument("--one", nargs=5, metavar=("KIND", "PATH", "VOCAB", "PAIRS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, path, vocab, pairs, tokens = args.one
        print(json.dumps(measure_one(kind, path, int(vocab), int(pairs), int(tokens))))
        return

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 2 threads; peak RSS per process")
    default_pairs = args.budget // (2 * PAIR_TOKENS)
    summary = []
    for vocab in [int(v) for v in args.vocabs.split(",")] if "memory" not in args.skip else []:
        print(f"\nSmolLM2-135M shape, vocabulary {vocab:,}:")
        rows = {}
        for kind in ("reference", "eval"):
            rows[kind, "new"] = run(kind, "chunked", vocab, default_pairs, PAIR_TOKENS)
            show(rows[kind, "new"])
            old = [run(kind, "old", vocab, n, PAIR_TOKENS) for n in (4, 8)]
            for row in old:
                show(row)
            if all("error" not in row for row in old):
                per_pair = (old[1]["peak_mib"] - old[0]["peak_mib"]) / 4
                rows[kind, "old@128"] = old[1]["peak_mib"] + per_pair * 120
                print(f"  {kind:9s} old at its default of 128 pairs (linear in pairs from 4 and 8: "
                      f"{per_pair:.0f} MiB a pair): ~{rows[kind, 'old@128']:,.0f} MiB")
        for path in ("chunked", "old", "backbone"):
            rows["step", path] = run("step", path, vocab, STEP_PAIRS, args.step_tokens)
            show(rows["step", path])
        peak = lambda key: rows[key].get("peak_mib", float("nan")) if isinstance(rows[key], dict) else rows[key]
        summary.append(f"vocab={vocab} reference_new_mib={peak(('reference', 'new'))} "
                       f"reference_old_default_mib={peak(('reference', 'old@128')):.0f} "
                       f"eval_new_mib={peak(('eval', 'new'))} eval_old_default_mib={peak(('eval', 'old@128')):.0f} "
                       f"step_new_mib={peak(('step', 'chunked'))} step_old_mib={peak(('step', 'old'))} "
                       f"step_backbone_mib={peak(('step', 'backbone'))}")
    if "speed" not in args.skip:
        from spo_ray.models import create_small_lm
        print("\nspeed, training steps interleaved in one process (best of rounds):")
        if args.multi_chunk:  # 2048 scored positions at 49k (1,365 a chunk), 1024 at 152k (441 a chunk)
            summary.append(speed("smollm2-135m-shape-2-chunks", smollm2_shape(49152).train(), 8, 256, 49152,
                                 args.speed_rounds))
            summary.append(speed("smollm2-135m-shape-152k-3-chunks", smollm2_shape(151936).train(), 4, 256, 151936,
                                 args.speed_rounds))
        else:  # one chunk each: the chunked head keeps its logits
            summary.append(speed("smollm2-135m-shape", smollm2_shape(49152).train(), 4, 256, 49152,
                                 args.speed_rounds))
            summary.append(speed("arithmetic-0.86m", create_small_lm(20).train(), 32, 24, 20, args.speed_rounds,
                                 steps=10))
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
