"""Text preference pairs → tokenized pairs → padded batches.

A pair is TRL's "implicit prompt" form: {"prompt": str, "chosen": str, "rejected": str}, where chosen and
rejected are the responses alone. Where the pairs come from (the built-in task, local files, the hub) is
`spo_ray.tasks`' business; this module only tokenizes and batches them.

Tokenization: the prompt as the tokenizer encodes it (with its BOS where it adds one), each response
without special tokens followed by EOS. A pair longer than `max_length` keeps the end of its prompt (at
least half the budget where the prompt is that long) and cuts its responses from the right; such pairs
are counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        """Tokens of the longer side: what the pair costs in a padded batch."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """Tokens of the pair's one row with its prompt shared (`collate_shared_prompts`)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated: int = 0


def _fit(prompt: list[int], response: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt > 0 else []
    return prompt, response[: max_length - len(prompt)], True


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int | None = None) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize text pairs; a pair over `max_length` keeps its prompt's end and cuts its responses' tails."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos_token; responses must end with one")
    stats = TokenizeStats()
    out = []
    for pair in pairs:
        prompt = list(tokenizer(pair["prompt"])["input_ids"])
        chosen = list(tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"]) + [eos]
        rejected = list(tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"]) + [eos]
        # Truncate both sides with the same prompt so the pair still shares its context.
        longest = chosen if len(chosen) >= len(rejected) else rejected
        fitted_prompt, _, cut = _fit(prompt, longest, max_length)
        room = None if max_length is None else max_length - len(fitted_prompt)
        out.append(TokenizedPair(fitted_prompt, chosen[:room], rejected[:room]))
        stats.pairs += 1
        stats.truncated += int(cut)
    return out, stats


class PairDataset(Dataset):
    """Tokenized pairs, indexable; `__getitem__` also returns the index (the key into reference caches)."""

    def __init__(self, pairs: list[TokenizedPair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[int, TokenizedPair]:
        return i, self.pairs[i]


def padded_tokens(pairs: int, length: int) -> int:
    """Tokens of a collated batch of `pairs` pairs padded to `length`: chosen and rejected rows, padding included."""
    return 2 * pairs * length


def length_sorted_batches(dataset: PairDataset, batch_size: int, max_tokens: int | None = None,
                          shared_prompts: bool = False) -> list[list[int]]:
    """Index batches of a pass that needs every pair once (reference log-probs, evaluation), shortest pairs
    first, so each batch pads to a length close to its own pairs'. Results are keyed by index, not order.

    A batch holds at most `batch_size` pairs and, with `max_tokens`, at most that many padded tokens
    (`batch_padded_tokens`; one row a pair with `shared_prompts`): what a no-grad forward's memory grows with.
    A pair longer than the budget alone still makes a batch of one."""
    if shared_prompts:
        return budget_batches([pair.shared_length for pair in dataset.pairs], batch_size, max_tokens)
    return budget_batches([pair.length for pair in dataset.pairs], batch_size, max_tokens, rows_per_item=2)


def budget_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None,
                   rows_per_item: int = 1) -> list[list[int]]:
    """`length_sorted_batches` for items of the given lengths that take `rows_per_item` rows each (a pair
    two, a single sequence one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:  # ascending lengths: the item joining a batch sets its padded width
        last = batches[-1] if batches else None
        if (last is None or len(last) == batch_size
                or (max_tokens is not None and rows_per_item * (len(last) + 1) * lengths[i] > max_tokens)):
            batches.append([i])
        else:
            last.append(i)
    return batches


def collate_rows(sides: list[tuple[list[int], list[int]]], pad_token_id: int, padding_side: str = "right") -> dict:
    """(prompt ids, response ids) rows, padded to the longest: `input_ids`, `attention_mask` and
    `response_mask` (response tokens only), each (N, T)."""
    rows = [prompt + response for prompt, response in sides]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, (prompt, response)) in enumerate(zip(rows, sides)):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
        response_mask[i, span] = torch.tensor([0] * len(prompt) + [1] * len(response))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(items: list[tuple[int, TokenizedPair]], pad_token_id: int, padding_side: str = "right") -> dict:
    """Stack prompt+chosen rows over prompt+rejected rows, padded to the batch's longest row.

    Returns `input_ids`, `attention_mask`, `response_mask` (2B, T) and `index` (B,).
    """
    sides = [(p.prompt_ids, p.chosen_ids) for _, p in items] + [(p.prompt_ids, p.rejected_ids) for _, p in items]
    return {**collate_rows(sides, pad_token_id, padding_side),
            "index": torch.tensor([i for i, _ in items], dtype=torch.long)}


def collate_shared_prompts(items: list[tuple[int, TokenizedPair]], pad_token_id: int) -> dict:
    """Prefix sharing: one row per pair, prompt + chosen + rejected, right-padded to the batch's longest.

    The prompt is run once instead of twice (Wang & Hegde 2024, "Accelerating Direct Preference Optimization
    with Prefix Sharing"). A (B, 1, T, T) boolean `pair_attention` (True: the query may attend to the key) is
    causal except that the rejected reply never sees the chosen one, and `position_ids` restart the rejected
    reply right after the prompt, so every token has the context and position it has in `collate_pairs`'
    separate rows: the same log-probs up to float rounding. A padding slot attends to itself only (a row of
    the mask with no True would make attention NaN).

    The logits at the prompt's last position score both replies' first tokens, so which position scores which
    token is explicit: `score_rows`, `score_columns` (the position whose logits score), `score_labels` (the
    token) and `score_sequences` (the output it counts for: i for pair i's chosen reply, B + i for its
    rejected one, `collate_pairs`' row order). As there, a reply token at position 0 (no prompt) is not scored.
    Also `attention_mask` (B, T: the real tokens, for counting) and `index` (B,).
    """
    pairs = [p for _, p in items]
    count, width = len(pairs), max(p.shared_length for p in pairs)
    input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    position_ids = torch.zeros((count, width), dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(count, 1, 1, 1)
    rows, columns, labels, sequences = [], [], [], []
    for b, pair in enumerate(pairs):
        prompt, chosen = len(pair.prompt_ids), len(pair.chosen_ids)
        length = pair.shared_length
        rejected_start = prompt + chosen
        input_ids[b, :length] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        attention_mask[b, :length] = 1
        position_ids[b, :rejected_start] = torch.arange(rejected_start)
        position_ids[b, rejected_start:length] = torch.arange(prompt, prompt + len(pair.rejected_ids))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        causal[rejected_start:, prompt:rejected_start] = False
        visible[b, 0, :length, :length] = causal
        # (scoring position, token) of each reply token: the position before it in its own context.
        for start, ids, sequence in ((prompt, pair.chosen_ids, b), (rejected_start, pair.rejected_ids, count + b)):
            for k, token in enumerate(ids):
                scorer = start + k - 1 if k else prompt - 1
                if scorer >= 0:
                    rows.append(b)
                    columns.append(scorer)
                    labels.append(token)
                    sequences.append(sequence)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "pair_attention": visible, "score_rows": as_long(rows), "score_columns": as_long(columns),
            "score_labels": as_long(labels), "score_sequences": as_long(sequences),
            "index": as_long([i for i, _ in items])}


def collate(shared_prompts: bool):
    """The collate function of a pass: `collate_shared_prompts` or `collate_pairs`."""
    return collate_shared_prompts if shared_prompts else collate_pairs


def batch_padded_tokens(pairs: list[TokenizedPair], shared_prompts: bool = False) -> int:
    """Tokens of these pairs collated into one batch, padding included: `collate_pairs`' chosen and rejected
    rows, or `collate_shared_prompts`' one row a pair."""
    if shared_prompts:
        return len(pairs) * max(p.shared_length for p in pairs)
    return padded_tokens(len(pairs), max(p.length for p in pairs))


@dataclass
class LengthGroupedSampler(Sampler):
    """Shuffled batches of similar-length pairs, to cut padding.

    Each epoch shuffles the indices, cuts them into mega-batches of `batch_size * group_factor`, sorts each
    mega-batch by length and deals it out in batches; then shuffles the batch order. Seeded per epoch.
    With `group_factor=1` it is a plain shuffled batch sampler.
    """

    lengths: list[int]
    batch_size: int
    seed: int = 0
    group_factor: int = 8
    drop_last: bool = True
    epoch: int = field(default=0)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * max(1, self.group_factor)
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
