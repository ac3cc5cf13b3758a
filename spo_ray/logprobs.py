"""Model outputs → per-sequence log-probabilities of the response tokens.

A preference batch (see `spo_ray.data.collate_pairs`) stacks the chosen sequences on top of the rejected
ones: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected. One forward pass over the 2B rows
gives both sides' log-probs (the DPO authors' "concatenated forward"), so a step costs one forward and
one backward however many terms the loss has.

Only response tokens count: `response_mask` marks them, prompt and padding are masked out. Position ids
are derived from the attention mask, so a left-padded row scores exactly like the same row right-padded.
Only the positions that score response tokens go through the LM head (transformers' `logits_to_keep`,
where the model takes it): the (N, T, V) logits over the prompt would otherwise be the largest activation
of a step whenever prompts are long or the vocabulary is large.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: 0, 1, 2, … starting at each row's first token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log π(x_t | x_<t) for t ≥ 1, shape (N, T−1): logits at t−1 score the token at t.

    Computed with cross-entropy in at least float32 (bf16 logits are upcast; float64 stays float64),
    which never materialises a second (N, T, V) tensor.
    """
    shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    labels = input_ids[:, 1:]
    flat = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels.reshape(-1), reduction="none")
    return -flat.view(labels.shape)


def response_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts per row, both shape (N,)."""
    mask = response_mask[:, 1:].to(torch.float32)
    per_token = token_logps(logits, input_ids)
    return (per_token * mask).sum(-1), mask.sum(-1)


def first_scoring_position(response_mask: Tensor) -> int:
    """The first position whose logits score a response token of some row: the one before the earliest
    response token in the batch (the columns before it score prompt and padding only)."""
    columns = response_mask.any(0).nonzero()
    return max(int(columns[0]) - 1, 0) if columns.numel() else 0


_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def peft_base(model):
    """The transformers model inside a peft wrapper (the model itself otherwise). A peft model passes its
    keyword arguments on to it, so its forward signature is the one that counts; it also names the blocks."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes_logits_to_keep(model) -> bool:
    """Whether `model`'s forward accepts `logits_to_keep` (transformers' causal LMs do), looking through
    DDP and peft wrappers. False for anything else, e.g. a plain function: it gets full logits."""
    if not isinstance(model, torch.nn.Module):
        return False
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = peft_base(model)
    kind = type(model)
    if kind not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[kind]


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Run `model` (any transformers causal LM) and return (summed response log-probs, token counts)."""
    start = first_scoring_position(response_mask)
    keep = {"logits_to_keep": input_ids.size(1) - start} if start and takes_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep)
    offset = input_ids.size(1) - out.logits.size(1)  # the positions left out of the logits (0 or start)
    return response_logps(out.logits, input_ids[:, offset:], response_mask[:, offset:])


def concatenated_forward(model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Chosen and rejected log-probs of a preference batch from one forward pass.

    Returns `chosen_logps`, `rejected_logps` (summed over response tokens), `chosen_avg_logps`,
    `rejected_avg_logps` (their per-token means) and `chosen_lengths`, `rejected_lengths`, each (B,).
    """
    sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    half = sums.size(0) // 2
    averages = sums / counts.clamp(min=1)
    return {
        "chosen_logps": sums[:half], "rejected_logps": sums[half:],
        "chosen_avg_logps": averages[:half], "rejected_avg_logps": averages[half:],
        "chosen_lengths": counts[:half], "rejected_lengths": counts[half:],
    }
