"""Pairs sampled from a model itself, verified by their final answer: built once, shared by every trial.

Reasoning-DPO work trains on the model's *own* answers, labelled by checking them — Iterative RPO (Pang et
al. 2024, arXiv:2404.19733): N samples per question at temperature T, winners the samples whose final answer
is correct, losers the others, K pairs per question by cycling through both sets, the gold solution as the
winner where no sample is correct, questions without a loser dropped. This module does the three parts:

1. **Generation** (`sample_batch`): a batch of prompts is scored once on a key/value cache
   (`spo_ray.decoding.generate`; their common prefix, a chat template's system turn, once for all), each row
   then repeated N times, and every sample extended one token at a time (temperature, top-p: `next_tokens`, one
   uniform number per sample and token from the batch's generator); a sample that emits a stop token leaves
   the batch and its cache at once. A prompt is prefilled once for its N samples (transformers' `generate`
   with `num_return_sequences` prefills it N times) and finished samples stop costing compute (`generate`
   keeps stepping them until the longest one ends): `benchmarks/sampling.py` measures the two against each
   other, and against one forward of a full batch (what decoding could reach if nothing but the model ran).
2. **The table** (`cached_samples`): the samples are a pure function of (sampler weights, prompts, sampling
   settings, seed), so they are stored once per key as a Parquet table in the sweep's shared cache, beside
   the inits it was sampled from (`<cache_dir>/samples/`: a local folder or a bucket, `spo_ray.storage`), and
   read by every trial, on every node, after `--resume` — and by the next sweep under the same storage path
   that asks for the same samples (a follow-up sweep over another loss does not sample again).
   Prompts go through in fixed batches (prompt order, up to `POOLS_PER_BATCH` times the token budget), each
   with its own generator seeded by (seed, batch number) and decoded by one continuously refilled pool of at
   most the budget's rows: the samples do not depend on how many workers shared the batches
   (`spo_ray.distributed.sample_on_cluster` spreads them over a Ray cluster) — only on the CPU's or GPU's
   arithmetic, as any sampling does.
3. **Pairs** (`build_pairs`): from a table and the source's checker, per prompt, as above; the counts of
   every prompt (samples, correct, pairs, gold used) are kept and summed into the `sampler/*` figures.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spo_ray import storage
from spo_ray.decoding import encode_prompts, evaluating, generate

SAMPLES_FORMAT = 3  # 2: tokens drawn by inverting the CDF at a table of uniform numbers; 3: refilled batches
# A batch (a unit of work and of random numbers) holds the prompts of this many full pools: prompts join the pool
# as samples end, so it runs full until its last prompts' longest samples (one pool a batch left a batch to its
# few rambling samples for most of its steps: docs/benchmarks.md).
POOLS_PER_BATCH = 4


@dataclass(frozen=True)
class SamplePrompt:
    """A prompt to sample answers to: the text the model continues, its reference answer, and (optional)
    the gold response text used as the winner where no sample is correct."""
    text: str
    answer: object
    gold: str | None = None
    question: str | None = None  # the user message a chat prompt renders (for `response_text`)


@dataclass
class SamplingSource:
    """What a source that can check answers hands the sampler: training and held-out prompts, the checker
    `check(completion, answer) -> bool`, how a completion becomes a pair's response text
    (`response_text(prompt, completion)`, e.g. through the chat template) and the tokens that end an answer."""
    train: list[SamplePrompt]
    eval: list[SamplePrompt]
    check: Callable[[str, object], bool]
    response_text: Callable[[SamplePrompt, str], str]
    stop_ids: set[int]


@dataclass(frozen=True)
class Sampling:
    """How to sample (the `data.sampled_pairs` settings that change the samples)."""
    samples_per_prompt: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    batch_tokens: int = 32768   # rows decoded at once hold at most this many tokens (each at full length)
    engine: str = "spo_ray"     # who samples (spo_ray.engines): its samples are not the other's

    def key_fields(self) -> dict:
        # The batch budget changes the samples too (batches set the generators), so it is part of the key.
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------------
# 1. Generation

def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from next-token logits (or log-probs: the same distribution): greedy at temperature 0,
    else a draw from softmax(logits / T) restricted to the smallest set of tokens whose probability reaches
    `top_p`, by inverting its cumulative distribution at the row's uniform number in [0, 1).

    One number a row (not `torch.multinomial`, which draws one exponential per vocabulary entry: 150 ms a step
    for 128 rows of a 49k vocabulary), summed in float64 so that no token's share is lost to rounding.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)
    threshold = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]
    # The first token whose cumulative mass exceeds the threshold: token i with probability p_i / total (a
    # token of probability 0 is never the first). Only a threshold rounded up to the total (u within 2^-53
    # of 1) passes the end; it takes the last token.
    return torch.searchsorted(cumulative, threshold, right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)


def sample_batch(model, prompt_ids: list[list[int]], sampling: Sampling, stop_ids: set[int], pad_id: int,
                 generator: torch.Generator) -> list[tuple[list[int], bool]]:
    """`samples_per_prompt` samples of each prompt, prompt by prompt (`spo_ray.decoding.generate`: each prompt
    scored once, finished samples dropped from the batch): (token ids without the stop token, whether a stop
    token ended it within `max_new_tokens`).

    Sample s of prompt p draws its t-th token with uniform number [p * samples_per_prompt + s, t] of a table
    drawn from `generator` up front: which rows share a step does not decide which numbers a row gets.
    """
    samples = len(prompt_ids) * sampling.samples_per_prompt
    uniforms = torch.rand(samples, sampling.max_new_tokens, generator=generator, dtype=torch.float64)
    device = next(model.parameters()).device

    def pick(logits, rows, steps):
        return next_tokens(logits, sampling.temperature, sampling.top_p, uniforms[rows.cpu(), steps.cpu()].to(device))
    continued = generate(model, prompt_ids, pick, stop_ids, pad_id, sampling.max_new_tokens,
                         copies=sampling.samples_per_prompt, max_rows=pool_rows([len(ids) for ids in prompt_ids],
                                                                                 sampling))
    return [(ids[:-1] if ended else ids, ended) for ids, ended in continued]


def pool_rows(prompt_lengths: list[int], sampling: Sampling) -> int:
    """Rows decoded at once: as many whole prompts' samples as fit `batch_tokens` at the longest prompt's full
    length (prompt + `max_new_tokens`), at least one prompt's."""
    width = max(prompt_lengths) + sampling.max_new_tokens
    per_prompt = sampling.samples_per_prompt
    return max(1, sampling.batch_tokens // (width * per_prompt)) * per_prompt


def plan_batches(prompt_lengths: list[int], sampling: Sampling) -> list[list[int]]:
    """Prompt indices in consecutive batches of at most `POOLS_PER_BATCH` × `batch_tokens` tokens, counting
    each prompt's `samples_per_prompt` rows at their longest (prompt + `max_new_tokens`)."""
    budget = POOLS_PER_BATCH * sampling.batch_tokens
    batches, current, widest = [], [], 0
    for index, length in enumerate(prompt_lengths):
        width = max(widest, length + sampling.max_new_tokens)
        if current and (len(current) + 1) * sampling.samples_per_prompt * width > budget:
            batches.append(current)
            current, width = [], length + sampling.max_new_tokens
        current.append(index)
        widest = width
    if current:
        batches.append(current)
    return batches


def derived_seed(*parts: int, bits: int = 63) -> int:
    """A seed of `bits` bits drawn from (seed, batch number, …) by hashing: nearby inputs give unrelated seeds."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << bits) - 1)


def batch_generator(seed: int, batch_number: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, batch_number))


def sample_rows(model, tokenizer, prompts: list[str], sampling: Sampling, stop_ids: set[int],
                batch_numbers: list[int] | None = None, progress: bool = False) -> list[dict]:
    """The table rows of the batches numbered `batch_numbers` (default all; `plan_batches` numbers them):
    {"prompt", "sample", "completion", "ended", "tokens"} for each sample of each of their prompts."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    batches = plan_batches([len(ids) for ids in prompt_ids], sampling)
    numbers = range(len(batches)) if batch_numbers is None else batch_numbers
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(batches[b]) for b in numbers), desc="sampling", unit="prompt")
    with evaluating(model):
        for number in numbers:
            indices = batches[number]
            samples = sample_batch(model, [prompt_ids[i] for i in indices], sampling, stop_ids, pad_id,
                                   batch_generator(sampling.seed, number))
            rows += batch_rows(tokenizer, indices, samples, sampling)
            if bar:
                bar.update(len(indices))
    if bar:
        bar.close()
    return rows


def batch_rows(tokenizer, indices: list[int], samples: list[tuple[list[int], bool]], sampling: Sampling
               ) -> list[dict]:
    """Table rows of one batch's samples (prompt by prompt, `samples_per_prompt` each, as `sample_batch` gives
    them), their completions decoded in one call."""
    completions = tokenizer.batch_decode([ids for ids, _ in samples], skip_special_tokens=True)
    rows = []
    for position, ((ids, ended), completion) in enumerate(zip(samples, completions)):
        prompt, sample = divmod(position, sampling.samples_per_prompt)
        rows.append({"prompt": indices[prompt], "sample": sample, "ended": ended, "tokens": len(ids),
                     "completion": completion})
    return rows


# ---------------------------------------------------------------------------------------------------
# 2. The table, once per key

def samples_dir(cache_dir: str) -> str:
    """Where sample tables live: the `samples` folder of the shared cache (a local folder or a URI)."""
    return storage.join(cache_dir, "samples")


def samples_key(sampler_identity: str, prompts: list[SamplePrompt], sampling: Sampling, stop_ids: set[int]) -> str:
    """The table's key: the sampler's weights, every prompt's text, the settings and the stop tokens."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt.text).encode())
    text = json.dumps([sampler_identity, digest.hexdigest(), sampling.key_fields(), sorted(stop_ids), SAMPLES_FORMAT],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_path(directory: str, key: str) -> str:
    return storage.join(directory, f"samples-{key}.parquet")


def write_samples(location: str, rows: list[dict], generation: dict) -> None:
    """The table, whole, with the generation's figures (seconds, tokens/s, workers) in its metadata."""
    columns = ("prompt", "sample", "ended", "tokens", "completion")
    table = pa.table({c: [row[c] for row in rows] for c in columns})
    table = table.replace_schema_metadata({"format": str(SAMPLES_FORMAT), "rows": str(len(rows)),
                                           "generation": json.dumps(generation)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(location, buffer.getvalue())


def read_samples(location: str) -> tuple[list[dict], dict] | None:
    """(rows, generation figures), or None where the table is missing, partial or of another format."""
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(location)))
        meta = table.schema.metadata or {}
        if int(meta.get(b"format", b"0")) != SAMPLES_FORMAT or int(meta.get(b"rows", b"-1")) != table.num_rows:
            return None
        return table.to_pylist(), json.loads(meta[b"generation"])
    except Exception:  # missing, truncated or foreign: rebuild
        return None


def generate_samples(model, tokenizer, prompts: list[SamplePrompt], sampling: Sampling, stop_ids: set[int],
                     progress: bool = False) -> tuple[list[dict], dict]:
    """Every sample of every prompt in this process, and the generation's figures."""
    started = time.perf_counter()
    rows = sample_rows(model, tokenizer, [p.text for p in prompts], sampling, stop_ids, progress=progress)
    return rows, generation_figures(rows, time.perf_counter() - started, workers=1, engine=sampling.engine)


def generation_figures(rows: list[dict], seconds: float, workers: int, engine: str = "spo_ray") -> dict:
    tokens = sum(row["tokens"] + row["ended"] for row in rows)  # a stop token is generated too
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            "workers": workers, "engine": engine}


def cached_samples(directory: str, key: str, generate: Callable[[], tuple[list[dict], dict]]
                   ) -> tuple[list[dict], dict, bool]:
    """The table of `key` in `directory`, or `generate()`d and written under the build lock (one builder
    per key, on one node or many). Returns (rows, generation figures, whether it was read)."""
    location = table_path(directory, key)

    def build() -> tuple[list[dict], dict]:
        rows, generation = generate()
        write_samples(location, rows, generation)
        return rows, generation
    (rows, generation), hit = storage.built_once(f"samples-{key}", directory, lambda: read_samples(location), build)
    return rows, generation, hit


# ---------------------------------------------------------------------------------------------------
# 3. Pairs

def pair_order(winners: int, losers: int, limit: int) -> list[tuple[int, int]]:
    """Up to `limit` distinct (winner, loser) index pairs, cycling through both sets: round d pairs winner w
    with loser (w + d) mod `losers` (all winners before the first repeats; every combination once)."""
    order = []
    for offset in range(losers):
        for w in range(winners):
            if len(order) == limit:
                return order
            order.append((w, (w + offset) % losers))
    return order


def build_pairs(prompts: list[SamplePrompt], rows: list[dict], check: Callable[[str, object], bool],
                response_text: Callable[[SamplePrompt, str], str], pairs_per_prompt: int, gold_fallback: bool,
                ) -> tuple[list[dict], list[dict]]:
    """(pairs, per-prompt counts) from a sample table.

    A sample is correct when it ended within `max_new_tokens` and `check(completion, answer)` holds (a cut-off
    sample never wins: it would teach the model to stop mid-answer); winners and losers are the distinct
    completions of each kind, in sample order. `response_text(prompt, completion)` renders a completion
    as a pair's response (e.g. through the chat template). Pairs per prompt: `pair_order`. The gold response
    wins where no sample is correct (`gold_fallback`); prompts without a loser, or without any winner, give none.
    """
    by_prompt: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["prompt"], r["sample"])):
        by_prompt.setdefault(row["prompt"], []).append(row)
    pairs, counts = [], []
    for index, prompt in enumerate(prompts):
        samples = by_prompt.get(index, [])
        correct = [bool(s["ended"]) and check(s["completion"], prompt.answer) for s in samples]
        winners = list(dict.fromkeys(response_text(prompt, s["completion"]) for s, ok in zip(samples, correct) if ok))
        losers = list(dict.fromkeys(response_text(prompt, s["completion"]) for s, ok in zip(samples, correct) if not ok))
        gold = not winners and gold_fallback and prompt.gold is not None and bool(losers)
        if gold:
            winners = [prompt.gold]
        made = pair_order(len(winners), len(losers), pairs_per_prompt) if winners and losers else []
        pairs += [{"prompt": prompt.text, "chosen": winners[w], "rejected": losers[l]} for w, l in made]
        counts.append({"prompt": index, "samples": len(samples), "correct": sum(correct),
                       "ended": sum(bool(s["ended"]) for s in samples), "pairs": len(made), "gold": gold})
    return pairs, counts


def sampler_figures(counts: list[dict], generation: dict) -> dict[str, float]:
    """What the sampler did, as `sampler/*` metrics: the samples' accuracy, the shares of prompts that gave
    a pair, whose samples were both right and wrong, always right or never right, pairs built, gold winners
    used, generation tokens/s."""
    prompts = max(1, len(counts))
    samples = sum(c["samples"] for c in counts)
    return {
        "sampler/prompts": float(len(counts)),
        "sampler/samples": float(samples),
        "sampler/sample_accuracy": sum(c["correct"] for c in counts) / max(1, samples),
        "sampler/ended_share": sum(c["ended"] for c in counts) / max(1, samples),
        "sampler/prompts_with_pair": sum(c["pairs"] > 0 for c in counts) / prompts,
        # the prompts whose own samples hold a right and a wrong answer (a pair without the gold fallback)
        "sampler/prompts_right_and_wrong": sum(0 < c["correct"] < c["samples"] for c in counts) / prompts,
        "sampler/prompts_all_correct": sum(c["samples"] > 0 and c["correct"] == c["samples"] for c in counts) / prompts,
        "sampler/prompts_none_correct": sum(c["correct"] == 0 for c in counts) / prompts,
        "sampler/gold_used": float(sum(c["gold"] for c in counts)),
        "sampler/pairs": float(sum(c["pairs"] for c in counts)),
        "sampler/tokens_per_s": float(generation.get("tokens_per_s", math.nan)),
        "sampler/seconds": float(generation.get("seconds", math.nan)),
    }


def no_pairs_message(where: str, counts: list[dict]) -> str:
    """The one line for a sampler that gave no pair (always right or always wrong), with its counts."""
    samples = sum(c["samples"] for c in counts)
    correct = sum(c["correct"] for c in counts)
    every = sum(c["samples"] > 0 and c["correct"] == c["samples"] for c in counts)
    none = sum(c["correct"] == 0 for c in counts)
    return (f"{where}: the sampler gave no pairs: {correct} of {samples} samples correct over {len(counts)} prompts "
            f"({every} prompts always right, {none} never right); a pair needs a right and a wrong answer to one "
            f"prompt (change the sampler, temperature or prompts, or turn on gold_fallback)")
