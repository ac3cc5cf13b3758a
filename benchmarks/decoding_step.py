"""Where a decoding step's time goes, on SmolLM2-135M-Instruct (float32): the figures behind docs/benchmarks.md's
"Continuous batching, grouped attention, the output matrix the other way round".

    .venv/bin/python benchmarks/decoding_step.py --cache /tmp/smol_cache        # about 4 minutes, 2 threads

1. The output matrix (49,152 × 576) applied to a batch of last hidden states as h·Wᵀ (`F.linear`, what
   transformers does) and as W·hᵀ (what `spo_ray.decoding.Decoder` does), at 32 and 128 rows; best of 10.
2. One decoding step (`Decoder.append`, a cache of the prompts + 24 tokens) at 16 to 128 rows, with the
   decoder as it is (the Llama family's step written out, `spo_ray.decode_step`), through transformers'
   forward with the output matrix applied as W·hᵀ (the decoder before the written-out step), and, at 128
   rows, transformers' whole forward (its h·Wᵀ output layer); best of 5. A line fitted to the step's time
   against its rows gives the step's fixed cost (the weights streamed once) and its cost per row (the matrix
   products).
3. Refilled batches against one pool a batch: `sample_rows` on `--refill-prompts` chat-arithmetic prompts × 8
   samples, pools of 16 prompts' rows, with `POOLS_PER_BATCH` 4 (prompts join as samples end) and 1 (each
   batch one pool, decoded to its last sample), same seed; tokens/s of each and their ratio.

Last line: `head_speedup_32=… head_speedup_128=… step_fixed_ms=… step_ms_per_row=… head_step_speedup_128=…
written_step_speedup_16=… written_step_speedup_128=… refill_speedup=…` (written_step: the transformers-forward
step's time ÷ the written-out one's).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import spo_ray.decoding as decoding  # noqa: E402
import spo_ray.sampling as sampling_module  # noqa: E402
from spo_ray.decoding import Decoder, encode_prompts  # noqa: E402
from spo_ray.models import gguf_init, load_init  # noqa: E402
from spo_ray.sampling import Sampling, sample_rows  # noqa: E402
from spo_ray.tasks.pairs import end_of_turn_id  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import prompts_and_answers  # noqa: E402  (benchmarks/sampling.py: the same prompts)


def best(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def step_seconds(model, prompt_ids, pad_id, rows: int, repeats: int = 5) -> float:
    per_prompt = rows // len(prompt_ids)
    decoder = Decoder(model, prompt_ids, pad_id, 24 + repeats + 2)
    decoder.repeat(per_prompt)
    token = torch.full((rows,), 16)
    for _ in range(24):
        decoder.append(token)
    return best(lambda: decoder.append(token), repeats)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refill-prompts", type=int, default=96, help="0: skip part 3")
    parser.add_argument("--cache", default=None, help="init cache for the converted GGUF (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_init(gguf_init("smollm2-135m-instruct", "float32",
                                           args.cache or tempfile.mkdtemp(prefix="decoding-step-")))
    model.eval()
    print(f"SmolLM2-135M-Instruct float32, {args.threads} thread(s), torch {torch.__version__}", flush=True)

    weight = model.get_output_embeddings().weight
    head = {}
    for rows in (32, 128):
        hidden = torch.randn(rows, weight.shape[1])
        linear = best(lambda: F.linear(hidden, weight), 10)
        transposed = best(lambda: torch.mm(weight, hidden.t()).t(), 10)
        head[rows] = linear / transposed
        print(f"output matrix, {rows:3d} rows: h·Wᵀ {linear * 1e3:6.1f} ms, W·hᵀ {transposed * 1e3:6.1f} ms "
              f"({head[rows]:.2f}×)", flush=True)

    prompts, _ = prompts_and_answers(tokenizer, 16)
    prompt_ids = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    row_counts = (16, 32, 64, 128)
    as_is = {rows: step_seconds(model, prompt_ids, pad, rows) for rows in row_counts}
    written_out = decoding.llama_step
    decoding.llama_step = lambda model: None
    forward = {rows: step_seconds(model, prompt_ids, pad, rows) for rows in row_counts}
    decoding.llama_step = written_out
    plain_head = decoding.plain_output_head
    decoding.plain_output_head = lambda model: None
    whole_forward = step_seconds(model, prompt_ids, pad, 128)
    decoding.plain_output_head = plain_head
    for rows in row_counts:
        print(f"decoding step, {rows:3d} rows: {as_is[rows] * 1e3:6.1f} ms ({rows / as_is[rows]:6.1f} tokens/s); "
              f"through transformers' forward {forward[rows] * 1e3:6.1f} ms ({forward[rows] / as_is[rows]:.2f}×)",
              flush=True)
    print(f"decoding step, 128 rows, transformers' whole forward: {whole_forward * 1e3:6.1f} ms", flush=True)
    xs = torch.tensor(row_counts, dtype=torch.float64)
    ys = torch.tensor([as_is[r] for r in row_counts], dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    fixed = float(ys.mean() - slope * xs.mean())
    print(f"fit: a step ≈ {fixed * 1e3:.0f} ms + {slope * 1e3:.2f} ms per row", flush=True)

    refill = float("nan")
    if args.refill_prompts:
        prompts, _ = prompts_and_answers(tokenizer, args.refill_prompts)
        stop = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
        widest = max(len(ids) for ids in encode_prompts(tokenizer, prompts)) + 48
        setting = Sampling(samples_per_prompt=8, temperature=0.8, max_new_tokens=48, seed=0,
                           batch_tokens=16 * 8 * widest)
        speed, refilled = {}, sampling_module.POOLS_PER_BATCH
        for pools in (refilled, 1):
            sampling_module.POOLS_PER_BATCH = pools
            started = time.perf_counter()
            rows = sample_rows(model, tokenizer, prompts, setting, stop)
            seconds = time.perf_counter() - started
            tokens = sum(r["tokens"] + r["ended"] for r in rows)
            speed[pools] = tokens / seconds
            print(f"{len(prompts)} prompts × 8, pools of 128 rows, {pools} pool(s) a batch: {tokens} tokens in "
                  f"{seconds:.1f} s = {speed[pools]:.1f} tokens/s", flush=True)
        sampling_module.POOLS_PER_BATCH = refilled
        refill = speed[refilled] / speed[1]
    print(f"head_speedup_32={head[32]:.2f} head_speedup_128={head[128]:.2f} step_fixed_ms={fixed * 1e3:.0f} "
          f"step_ms_per_row={slope * 1e3:.2f} "
          f"head_step_speedup_128={whole_forward / forward[128]:.2f} "
          f"written_step_speedup_16={forward[16] / as_is[16]:.2f} "
          f"written_step_speedup_128={forward[128] / as_is[128]:.2f} "
          f"refill_speedup={refill:.2f}")


if __name__ == "__main__":
    main()
