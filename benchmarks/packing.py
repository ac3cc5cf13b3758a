"""Padding-free (packed) batches against spo-ray's padded, length-grouped ones, on this CPU.

    .venv/bin/python benchmarks/packing.py [--rounds 3] [--batches 4]

A packed batch puts all of a step's rows (chosen and rejected of every pair) end to end in one row, with
position ids restarting at 0 for each; transformers then masks attention block-diagonally (its
`find_packed_sequence_indices`) — here an explicit block-diagonal causal mask — so no token attends across rows
and no slot is padding. With SDPA on a CPU that block-diagonal mask is dense: attention costs (total length)² instead
of Σ (row length)², which the saved padding has to pay for. (Without an explicit mask the SDPA path takes
its causal shortcut and rows attend across their boundaries, so the mask is given here as a 4D boolean one.)

Model and pairs: the 30.4M-parameter Llama and synthetic pairs of `benchmarks/vs_trl.py` (vocabulary 16,384,
61–249 tokens a pair), batches of 8 pairs as spo-ray's length-grouped sampler makes them. Each variant runs the
backbone forward and backward, then the LM head over the response positions only (identical work in both), with
torch on 2 threads; the variants alternate within each round and the best round counts. A check first compares
the packed and padded log-probs of the first batch. Last line: `packed_vs_padded_tokens_per_s=… max_logp_diff=…`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vs_trl  # noqa: E402  (the shared set-up: tokenizer, synthetic pairs, model shape)


def response_logps(model, hidden: torch.Tensor, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the tokens that the True positions of `scores` predict (one scalar per True run)."""
    rows, cols = scores.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols]).float()
    return -F.cross_entropy(logits, input_ids[rows, cols + 1], reduction="none")


def padded_step(model, batch) -> torch.Tensor:
    from spo_ray.logprobs import position_ids_from_mask
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=position_ids_from_mask(batch["attention_mask"])).last_hidden_state
    return response_logps(model, hidden, batch["input_ids"], batch["response_mask"][:, 1:].bool())


def packed(batch) -> dict:
    """The batch's rows without their padding, end to end in one row, position ids restarting per row."""
    keep = batch["attention_mask"].bool()
    ids = batch["input_ids"][keep][None]
    positions = torch.cat([torch.arange(int(n)) for n in keep.sum(-1)])[None]
    response = batch["response_mask"][keep][None]
    # the last token of one row must not score the first token of the next: mask the scoring position there
    scores = response[:, 1:].bool() & (positions[:, 1:] != 0)
    # Block-diagonal causal attention, given explicitly: with no mask, transformers' SDPA path takes its
    # is_causal shortcut and lets rows attend across their boundaries (seen here: log-probs off by nats).
    segment = (positions == 0).cumsum(-1)[0]
    length = segment.numel()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & (segment[:, None] == segment[None, :]))[None, None]
    return {"input_ids": ids, "position_ids": positions, "scores": scores, "mask": mask}


def packed_step(model, pack) -> torch.Tensor:
    hidden = model.model(input_ids=pack["input_ids"], position_ids=pack["position_ids"],
                         attention_mask=pack["mask"]).last_hidden_state
    return response_logps(model, hidden, pack["input_ids"], pack["scores"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from spo_ray.data import LengthGroupedSampler, PairDataset, collate_pairs, tokenize_pairs

    tokenizer = vs_trl.word_tokenizer(16384)
    pairs, _ = tokenize_pairs(vs_trl.synthetic_pairs(64, 16384, 256), tokenizer)
    data = PairDataset(pairs)
    indices = LengthGroupedSampler([p.length for p in pairs], 8, seed=0).batches()[:args.batches]
    batches = [collate_pairs([data[i] for i in b], 0) for b in indices]
    packs = [packed(b) for b in batches]
    model = vs_trl.llama(16384, 512, 4, seed=0, max_tokens=512).train()
    with torch.no_grad():
        difference = (padded_step(model, batches[0]) - packed_step(model, packs[0])).abs().max().item()
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_slots = sum(b["input_ids"].numel() for b in batches)
    rates = {"padded": [], "packed": []}
    for round_ in range(args.rounds + 1):  # round 0 warms both up
        for label in rates:
            start = time.perf_counter()
            for batch, pack in zip(batches, packs):
                out = padded_step(model, batch) if label == "padded" else packed_step(model, pack)
                out.sum().backward()
                model.zero_grad(set_to_none=True)
            if round_:
                rates[label].append(real_tokens / (time.perf_counter() - start))
    best = {k: max(v) for k, v in rates.items()}
    print(f"torch {torch.__version__}, 2 threads; {args.batches} length-grouped batches of 8 pairs: {real_tokens:,} "
          f"real tokens in {padded_slots:,} padded slots ({1 - real_tokens / padded_slots:.0%} padding); packed rows "
          f"of {min(p['input_ids'].size(1) for p in packs):,}–{max(p['input_ids'].size(1) for p in packs):,} tokens")
    for label, values in rates.items():
        print(f"  {label}: {best[label]:,.0f} real tokens/s (rounds {', '.join(f'{v:,.0f}' for v in values)})")
    print(f"packed_vs_padded_tokens_per_s={best['packed'] / best['padded']:.3f} max_logp_diff={difference:.2e}")


if __name__ == "__main__":
    main()
