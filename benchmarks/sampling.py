"""Generation for sampled pairs: spo-ray's sampler against transformers' `generate`, same model, prompts and
settings.

    .venv/bin/python benchmarks/sampling.py                 # SmolLM2-135M-Instruct, 32 prompts × 8 samples
    .venv/bin/python benchmarks/sampling.py --prompts 64 --rounds 3 --threads 1

Both sample `--samples` answers of at most `--max-new-tokens` tokens to each of `--prompts` chat-arithmetic
questions ("What is a + b? Answer with just the number.", operands 0-20, rendered with the model's chat
template) at temperature 0.8, top-p 1, stopping at EOS or the end-of-turn token:

  (a) spo-ray       `spo_ray.sampling.sample_rows`: each prompt scored once on a key/value cache, its cache
                    repeated for the samples, finished samples dropped from the batch as they end and the next
                    prompts joining in their places (at most `--batch-prompts` prompts' rows at a time);
  (b) transformers  `model.generate(do_sample=True, num_return_sequences=N)` on the same left-padded batch:
                    the prompt repeated N times before the first forward, every row stepped until the longest
                    one ends (finished rows are padded, not removed).

  (c) vLLM          where it is installed (`spo_ray.engines.VllmEngine`: vLLM in its own environment, `make
                    vllm`, or `SPO_RAY_VLLM_PYTHON`), all prompts in one request list, the engine started once
                    before the rounds (its start-up is printed and in the last line, not in its tokens/s); then
                    greedy replies of both engines compared token for token; and the greedy evaluation as
                    `data.eval_engine: vllm` runs it (`PolicyEngine`: a first evaluation that starts the engine,
                    a later one that writes the weights and reloads them in place), against spo-ray's.

  (a') spo-ray     the same sampler with every decoding step through transformers' forward instead of the
                    Llama family's step written out (`spo_ray.decode_step`): the step's own speed-up, same run.

Each round runs (a), (a'), then (b) (then (c)) on the same prompts (batches of `--batch-prompts` prompts' rows),
interleaved so that a load change on the machine hits both; tokens/s counts generated tokens up to and including
each sample's stop token (padding after it is not counted). The best round of each is reported, and their ratio. A
check line compares what the two sampled: the share of samples whose final number is right and that ended, which
must agree within sampling noise (the same distribution, different random streams). Last line:
`speedup_vs_generate=… tokens_per_s_spo_ray=… tokens_per_s_generate=… accuracy_spo_ray=… accuracy_generate=…
step_speedup=…` (the last: (a) ÷ (a'); `greedy_step_speedup` the same for the greedy evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from spo_ray.answers import matches  # noqa: E402
import spo_ray.decoding as decoding  # noqa: E402
from spo_ray.decoding import Decoder, encode_prompts, greedy_decode  # noqa: E402
from spo_ray.models import gguf_init, load_init  # noqa: E402
from spo_ray.sampling import Sampling, sample_rows  # noqa: E402
from spo_ray.tasks.chat_arithmetic import question, solve  # noqa: E402
from spo_ray.tasks.pairs import chat_prompt, end_of_turn_id  # noqa: E402
from spo_ray.config import ChatArithmeticConfig  # noqa: E402
from spo_ray.engines import PolicyEngine, VllmEngine, vllm_python, vllm_rows  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="init cache for the converted GGUF (default: a temp folder)")
    parser.add_argument("--greedy-prompts", type=int, default=200,
                        help="greedy evaluation: this many questions, 64 rows at a time (0: skip)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (scripts/gpu_check.sh)")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="also run vLLM (spo_ray.engines.VllmEngine; auto: where installed)")
    return parser.parse_args()


def prompts_and_answers(tokenizer, count: int):
    cfg = ChatArithmeticConfig()
    problems = [(a, b, "+") for a in range(0, 21) for b in range(0, 21)]
    step = max(1, len(problems) // count)
    chosen = problems[::step][:count]
    return [chat_prompt(tokenizer, question(cfg, p)) for p in chosen], [solve(*p) for p in chosen]


def run_spo_ray(model, tokenizer, prompts, args, stop_ids, seed):
    # The token budget of `--batch-prompts` prompts' samples at full length: at most that many rows at a time,
    # as `generate` gets, with the next prompts joining as samples end.
    widest = max(len(ids) for ids in encode_prompts(tokenizer, prompts)) + args.max_new_tokens
    sampling = Sampling(samples_per_prompt=args.samples, temperature=0.8, max_new_tokens=args.max_new_tokens,
                        seed=seed, batch_tokens=args.batch_prompts * args.samples * widest)
    rows = sample_rows(model, tokenizer, prompts, sampling, stop_ids)
    tokens = sum(r["tokens"] + r["ended"] for r in rows)
    return tokens, [(r["prompt"], r["completion"], r["ended"]) for r in rows]


@contextlib.contextmanager
def through_transformers_forward():
    """spo-ray's decoder with every step through transformers' forward (the written-out Llama step off)."""
    written_out = decoding.llama_step
    decoding.llama_step = lambda model: None
    try:
        yield
    finally:
        decoding.llama_step = written_out


def run_spo_ray_forward(model, tokenizer, prompts, args, stop_ids, seed):
    with through_transformers_forward():
        return run_spo_ray(model, tokenizer, prompts, args, stop_ids, seed)


def run_vllm(engine, tokenizer, prompts, args, stop_ids, seed):
    sampling = Sampling(samples_per_prompt=args.samples, temperature=0.8, max_new_tokens=args.max_new_tokens,
                        seed=seed, batch_tokens=10**9, engine="vllm")  # one request list: vLLM batches itself
    rows = vllm_rows(engine, tokenizer, encode_prompts(tokenizer, prompts), sampling, stop_ids)
    tokens = sum(r["tokens"] + r["ended"] for r in rows)
    return tokens, [(r["prompt"], r["completion"], r["ended"]) for r in rows]


@torch.no_grad()
def run_generate(model, tokenizer, prompts, args, stop_ids, seed):
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    samples, tokens = [], 0
    for start in range(0, len(prompts), args.batch_prompts):
        batch = tokenizer(prompts[start:start + args.batch_prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(args.device)
        out = model.generate(**batch, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
                             max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples,
                             eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
        generated = out[:, batch["input_ids"].shape[1]:].tolist()
        for row, ids in enumerate(generated):
            end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
            kept = ids if end is None else ids[:end]
            tokens += len(kept) + (end is not None)
            samples.append((start + row // args.samples, tokenizer.decode(kept, skip_special_tokens=True),
                            end is not None))
    return tokens, samples


@torch.no_grad()
def ceiling(model, tokenizer, prompts, args, cached: int = 24, repeats: int = 3) -> float:
    """What decoding could reach if nothing but the model ran: tokens/s of one forward of a full batch
    (`--batch-prompts` prompts × `--samples` rows) on a cache of its prompts and `cached` tokens more (a sample's
    typical length), best of `repeats`."""
    decoder = Decoder(model, encode_prompts(tokenizer, prompts[:args.batch_prompts]), tokenizer.pad_token_id,
                      cached + repeats)
    decoder.repeat(args.samples)
    token = torch.full((decoder.next_logits.size(0),), tokenizer.encode("1", add_special_tokens=False)[0],
                       device=args.device)
    for _ in range(cached):
        decoder.append(token)
    seconds = []
    for _ in range(repeats):
        synchronize(args.device)
        started = time.perf_counter()
        decoder.append(token)
        synchronize(args.device)
        seconds.append(time.perf_counter() - started)
    return len(token) / min(seconds)


@torch.no_grad()
def greedy_evaluation(model, tokenizer, args, stop_ids, batch: int = 64, with_vllm: bool = False) -> str:
    """The accuracy evaluator's workload (`--greedy-prompts` questions, `batch` rows at a time, as chat
    arithmetic's evaluation runs): `spo_ray.decoding.greedy_decode` (rows leave as they end, the next questions
    join) against `generate(do_sample=False)` on the same left-padded batches; tokens/s of each (up to and
    including each reply's stop token) and how many replies are the same token for token. `with_vllm`: also
    the vLLM evaluator's first evaluation (engine start) and a later one (weights written and reloaded)."""
    prompts, _ = prompts_and_answers(tokenizer, args.greedy_prompts)
    synchronize(args.device)
    started = time.perf_counter()
    ours = greedy_decode(model, tokenizer, prompts, args.max_new_tokens, batch_size=batch, stop_ids=stop_ids)
    synchronize(args.device)
    ours_s = time.perf_counter() - started
    with through_transformers_forward():
        started = time.perf_counter()
        forward = greedy_decode(model, tokenizer, prompts, args.max_new_tokens, batch_size=batch, stop_ids=stop_ids)
        synchronize(args.device)
        forward_s = time.perf_counter() - started
    tokenizer.padding_side = "left"
    theirs = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(args.device)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
        for ids in out[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
            theirs.append(ids if end is None else ids[:end + 1])
    synchronize(args.device)
    theirs_s = time.perf_counter() - started
    tokens = sum(map(len, ours))
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"greedy evaluation: {len(prompts)} questions, {batch} rows at a time: spo-ray {tokens} tokens in "
          f"{ours_s:.1f} s = {tokens / ours_s:.1f} tokens/s, generate {sum(map(len, theirs))} tokens in {theirs_s:.1f} s "
          f"= {sum(map(len, theirs)) / theirs_s:.1f} tokens/s; {same} of {len(prompts)} replies the same", flush=True)
    print(f"greedy evaluation through transformers' forward: {sum(map(len, forward))} tokens in {forward_s:.1f} s "
          f"(the written-out step {forward_s / ours_s:.2f}× faster); "
          f"{sum(a == b for a, b in zip(ours, forward))} of {len(prompts)} replies the same", flush=True)
    fields = (f" greedy_speedup_vs_generate={(tokens / ours_s) / (sum(map(len, theirs)) / theirs_s):.2f} "
              f"greedy_tokens_per_s_spo_ray={tokens / ours_s:.1f} greedy_same_as_generate={same}/{len(prompts)} "
              f"greedy_step_speedup={forward_s / ours_s:.2f}")
    if not with_vllm:
        return fields
    # `data.eval_engine: vllm` as a trial runs it (spo_ray.engines.PolicyEngine): the first evaluation starts
    # the engine on the written weights, each later one writes them again and reloads them in place.
    policy = PolicyEngine("float32")
    try:
        started = time.perf_counter()
        policy.greedy(model, tokenizer, prompts, args.max_new_tokens, stop_ids)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        replies = policy.greedy(model, tokenizer, prompts, args.max_new_tokens, stop_ids)
        later_s = time.perf_counter() - started
        start_s, reload_s = policy.started_s, policy.reloaded_s[0]
    finally:
        policy.close()
    vllm_tokens = sum(map(len, replies))
    same_vllm = sum(a == b for a, b in zip(ours, replies))
    print(f"greedy evaluation by vLLM (data.eval_engine: vllm): first {first_s:.1f} s (engine start {start_s:.1f} s), "
          f"each later {later_s:.1f} s (weights written, then reloaded in {reload_s:.2f} s) = "
          f"{vllm_tokens / later_s:.1f} tokens/s against spo-ray's {tokens / ours_s:.1f}; {same_vllm} of "
          f"{len(prompts)} replies the same as spo-ray's", flush=True)
    return fields + (f" eval_vllm_start_s={start_s:.1f} eval_vllm_reload_s={reload_s:.2f} "
                     f"eval_vllm_later_s={later_s:.1f} eval_spo_ray_s={ours_s:.1f} "
                     f"eval_spo_ray_vs_vllm={later_s / ours_s:.2f} eval_vllm_same={same_vllm}/{len(prompts)}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def accuracy(samples, answers) -> float:
    return sum(ended and matches(text, answers[p]) for p, text, ended in samples) / len(samples)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="sampling-bench-")
    folder = gguf_init("smollm2-135m-instruct", "float32", cache)
    model, tokenizer = load_init(folder)
    model.to(args.device)
    model.generation_config.top_k = None  # sample from the whole vocabulary, as (a) does
    stop_ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    prompts, answers = prompts_and_answers(tokenizer, args.prompts)
    print(f"{len(prompts)} prompts × {args.samples} samples, ≤ {args.max_new_tokens} new tokens, batches of "
          f"{args.batch_prompts} prompts, {args.threads} thread(s), {args.device}, torch {torch.__version__}",
          flush=True)
    engines = [("spo-ray", run_spo_ray), ("spo-ray, transformers' forward", run_spo_ray_forward),
               ("generate", run_generate)]
    vllm = None
    if args.vllm == "on" or (args.vllm == "auto" and vllm_python()):
        started = time.perf_counter()
        longest = max(len(ids) for ids in encode_prompts(tokenizer, prompts))
        vllm = VllmEngine(folder, "float32", 0, longest + args.max_new_tokens, args.device)
        print(f"vLLM engine started in {time.perf_counter() - started:.1f} s ({vllm_python()})", flush=True)
        engines.append(("vllm", lambda *a, **k: run_vllm(vllm, *a[1:], **k)))
    best = {name: 0.0 for name, _ in engines} | {"ceiling": 0.0}
    seen = {name: [] for name, _ in engines}
    for round_number in range(args.rounds):
        best["ceiling"] = max(best["ceiling"], ceiling(model, tokenizer, prompts, args))
        print(f"round {round_number + 1} ceiling   one forward of {args.batch_prompts * args.samples} cached rows = "
              f"{best['ceiling']:6.1f} tokens/s (best so far)", flush=True)
        for name, run in engines:
            synchronize(args.device)
            started = time.perf_counter()
            tokens, samples = run(model, tokenizer, prompts, args, stop_ids, seed=round_number)
            synchronize(args.device)
            seconds = time.perf_counter() - started
            best[name] = max(best[name], tokens / seconds)
            seen[name] += samples
            print(f"round {round_number + 1} {name:30s} {tokens:6d} tokens in {seconds:6.1f} s = "
                  f"{tokens / seconds:6.1f} "
                  f"tokens/s, samples right {accuracy(samples, answers):.3f}", flush=True)
    acc = {name: accuracy(samples, answers) for name, samples in seen.items()}
    n = len(seen["spo-ray"])
    noise = 2 * math.sqrt(2 * max(acc["spo-ray"] * (1 - acc["spo-ray"]), 1e-9) / n)
    print(f"check: samples right " + ", ".join(f"{acc[name]:.3f} ({name})" for name in seen) +
          f", {n} samples each; two standard errors of a difference {noise:.3f}")
    vllm_fields = ""
    if vllm is not None:
        # Greedy: the same text from both engines (float32, one machine)?
        ours = greedy_decode(model, tokenizer, prompts, args.max_new_tokens, stop_ids=stop_ids)
        theirs = vllm.generate(encode_prompts(tokenizer, prompts), 1, 0.0, 1.0, args.max_new_tokens, stop_ids)
        same = sum((a[:-1] if a and a[-1] in stop_ids else a) == ids for a, [(ids, _)] in zip(ours, theirs))
        print(f"greedy: {same} of {len(prompts)} replies token for token the same (spo-ray vs vLLM)")
        vllm_fields = (f" tokens_per_s_vllm={best['vllm']:.1f} vllm_start_s={vllm.started_s:.1f} "
                       f"spo_ray_vs_vllm={best['spo-ray'] / best['vllm']:.2f} accuracy_vllm={acc['vllm']:.3f} "
                       f"greedy_same={same}/{len(prompts)}")
        vllm.close()
    greedy_fields = ""
    if args.greedy_prompts:
        greedy_fields = greedy_evaluation(model, tokenizer, args, stop_ids, with_vllm=vllm is not None)
    print(f"speedup_vs_generate={best['spo-ray'] / best['generate']:.2f} tokens_per_s_spo_ray={best['spo-ray']:.1f} "
          f"tokens_per_s_generate={best['generate']:.1f} tokens_per_s_ceiling={best['ceiling']:.1f} "
          f"spo_ray_vs_ceiling={best['spo-ray'] / best['ceiling']:.2f} accuracy_spo_ray={acc['spo-ray']:.3f} "
          f"accuracy_generate={acc['generate']:.3f} step_speedup={best['spo-ray'] / best[engines[1][0]]:.2f}"
          + vllm_fields + greedy_fields)


if __name__ == "__main__":
    main()
