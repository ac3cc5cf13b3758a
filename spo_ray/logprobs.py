"""Model outputs → per-sequence log-probabilities of the response tokens.

A preference batch (see `spo_ray.data.collate_pairs`) stacks the chosen sequences on top of the rejected
ones: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected. One forward pass over the 2B rows
gives both sides' log-probs (the DPO authors' "concatenated forward"), so a step costs one forward and
one backward however many terms the loss has.

With prefix sharing (`train.prefix_sharing`, `spo_ray.data.collate_shared_prompts`) a pair is one row instead:
prompt, chosen, rejected, with a 4D mask that hides the chosen reply from the rejected one and positions that
restart the rejected reply after the prompt; the batch then says which position scores which token
(`scored_logps`), since the prompt's last position scores the first token of both replies.

Only response tokens count: `response_mask` marks them, prompt and padding are masked out. Position ids
are derived from the attention mask, so a left-padded row scores exactly like the same row right-padded.

Real models have 50k–150k-token vocabularies, and the (rows × positions × vocabulary) logits of a batch
would be its largest tensor by far (256 rows × 300 positions × 49,152 × 4 bytes is 15 GiB). So the LM head
never sees a whole batch: the model runs with its own head swapped, for the length of one forward, for a
function that takes the last hidden states of exactly the positions that score a response token (position
t scores token t+1) and applies the head + log-softmax + gather to `chunk` positions at a time
(`chunked_token_logps`). In a training step each chunk is checkpointed, so its logits are recomputed in the
backward instead of stored: no tensor of positions × vocabulary larger than one chunk ever exists (the
technique of Liger-Kernel's fused linear cross-entropy and torchtune's chunked output, in plain PyTorch so
it runs the same on CPU and GPU). The swap happens inside the model's own forward, so DDP's and FSDP's
hooks see an ordinary forward and peft's LoRA layers apply as usual.

Models whose head output is post-processed (Gemma 2's logit soft-capping, Cohere's logit scale) and plain
callables get the full logits of the response positions instead (`full_logits_sequence_logps`), the path
the fused one is tested against.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

# float32 logits of one chunk of positions: 256 MiB here, so ~1,300 positions of a 49k vocabulary and ~440 of
# a 152k one; a small model's whole batch is one chunk.
LOGITS_CHUNK_BYTES = 256 * 2**20
# Head outputs that are rescaled after the LM head: their log-probs need the model's own post-processing.
_POST_PROCESSED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


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


def chunk_positions(vocab_size: int) -> int:
    """How many positions one chunk of float32 logits holds within `LOGITS_CHUNK_BYTES`."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _as_float32(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_logps(head, hidden: Tensor, labels: Tensor) -> Tensor:
    return -F.cross_entropy(_as_float32(head(hidden)), labels, reduction="none")


def wpo_aligned_logps(logits: Tensor, logps: Tensor) -> Tensor:
    """log π(y_t) − log Σ_v π(v)², per scored token, without gradient: the exponent of WPO's weight (Zhou et al.
    2024, arXiv:2406.11827, Eq. 2; TRL's `use_weighting`). Σ_v π(v)² is the probability that two samples of the
    token agree, so the difference is the token's log-prob renormalised to the policy's own sampling: an
    off-policy token scores low. log Σ_v π(v)² = logsumexp(2z) − 2·logsumexp(z) for logits z."""
    with torch.no_grad():
        logits = _as_float32(logits)
        return logps.detach() - ((2 * logits).logsumexp(-1) - 2 * logits.logsumexp(-1))


def _chunk_logps_and_wpo(head, hidden: Tensor, labels: Tensor) -> Tensor:
    """(2, m): the chunk's token log-probs (with gradient) over WPO's aligned ones (without)."""
    logits = _as_float32(head(hidden))
    logps = -F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([logps, wpo_aligned_logps(logits, logps)])


def chunked_token_logps(head, hidden: Tensor, labels: Tensor, chunk: int, wpo: bool = False) -> Tensor:
    """log-softmax(head(hidden))[label] for (M, H) hidden states and (M,) labels, `chunk` rows at a time;
    `wpo`: (2, M), WPO's aligned log-probs under them (`wpo_aligned_logps`), from the same logits.

    With gradients on and more than one chunk, each chunk is checkpointed (non-reentrant): the backward
    recomputes the chunk's logits from its hidden states, so at most one chunk of logits (and their gradient)
    is alive at once. A batch that fits one chunk keeps its logits for the backward instead (no more memory
    than a chunk, and no recomputation: the full-logits path's speed).
    """
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad and hidden.size(0) > chunk
    of_chunk = _chunk_logps_and_wpo if wpo else _chunk_logps
    parts = []
    for start in range(0, hidden.size(0), chunk):
        piece, targets = hidden[start:start + chunk], labels[start:start + chunk]
        if checkpointed:
            parts.append(checkpoint(of_chunk, head, piece, targets, use_reentrant=False))
        else:
            parts.append(of_chunk(head, piece, targets))
    if not parts:
        return hidden.new_zeros((2, 0) if wpo else 0, dtype=torch.float32)
    return torch.cat(parts, dim=-1)


_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def peft_base(model):
    """The transformers model inside a peft wrapper (the model itself otherwise). A peft model passes its
    keyword arguments on to it, so its forward signature is the one that counts; it also names the blocks."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformers_model(model):
    """The transformers model inside DDP and peft wrappers, or None for anything that is not a module."""
    if not isinstance(model, torch.nn.Module):
        return None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return peft_base(model)


def takes_logits_to_keep(model) -> bool:
    """Whether `model`'s forward accepts `logits_to_keep` (transformers' causal LMs do), looking through
    DDP and peft wrappers. False for anything else, e.g. a plain function."""
    model = transformers_model(model)
    if model is None:
        return False
    kind = type(model)
    if kind not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[kind]


_full_logits_only = False


@contextmanager
def full_logits_only():
    """Inside the block every pass goes through the full logits (`full_logits_sequence_logps`): the path
    before the chunked head, which benchmarks and tests compare it against."""
    global _full_logits_only
    previous, _full_logits_only = _full_logits_only, True
    try:
        yield
    finally:
        _full_logits_only = previous


def fused_head(model):
    """The LM head module the chunked path swaps, or None where it cannot (see the module docstring)."""
    if _full_logits_only:
        return None
    inner = transformers_model(model)
    if inner is None or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if not isinstance(head, torch.nn.Module) or any(getattr(config, name, None) for name in _POST_PROCESSED_LOGITS):
        return None
    return head


@contextmanager
def _head_replaced(head: torch.nn.Module, replacement):
    """`head`'s forward is `replacement(original_forward, hidden)` inside the block (an instance attribute
    shadows the class's forward; deleting it restores the module)."""
    original = head.forward
    head.forward = lambda hidden: replacement(original, hidden)
    try:
        yield
    finally:
        del head.forward


def _row_scoring(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor):
    """A row a sequence: the model's inputs, and (rows, columns, labels) of its scored tokens (t scores t+1),
    in order within each row."""
    rows, columns = response_mask[:, 1:].bool().nonzero(as_tuple=True)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask)}
    return inputs, rows, columns, input_ids[rows, columns + 1]


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                   parameters: dict | None = None) -> tuple[Tensor, Tensor]:
    """Run `model` (any transformers causal LM) and return (summed response log-probs, token counts) per row.

    `parameters`: weights to run the model with instead of its own (`torch.func.functional_call`), e.g.
    the one_step estimator's stepped copy.
    """
    inputs, rows, columns, labels = _row_scoring(input_ids, attention_mask, response_mask)
    return scored_logps(model, inputs, rows, columns, labels, rows, input_ids.size(0), parameters)


def scored_token_logps(model, inputs: dict[str, Tensor], rows: Tensor, columns: Tensor, labels: Tensor,
                       parameters: dict | None = None, wpo: bool = False) -> Tensor:
    """log π(labels[m]) (M,), where the logits at position columns[m] of row rows[m] of the model's forward over
    `inputs` score token labels[m]; `wpo`: (2, M), WPO's aligned log-probs under them (`wpo_aligned_logps`)."""
    head = fused_head(model)
    if head is None:
        return full_logits_token_logps(model, inputs, rows, columns, labels, parameters, wpo)
    return fused_token_logps(model, head, inputs, rows, columns, labels, parameters, wpo)


def sequence_sums(values: Tensor, sequences: Tensor, count: int) -> Tensor:
    """Σ values[m] over the m with sequences[m] = s, for s < `count` (at least float32)."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    return torch.zeros(count, dtype=dtype, device=values.device).index_add(0, sequences, values.to(dtype))


def scored_logps(model, inputs: dict[str, Tensor], rows: Tensor, columns: Tensor, labels: Tensor,
                 sequences: Tensor, count: int, parameters: dict | None = None) -> tuple[Tensor, Tensor]:
    """Σ log π(labels[m]) over the m with sequences[m] = s, and their count, for s < `count` (`scored_token_logps`).

    The general form of `sequence_logps` (where a row is a sequence and t scores t+1), also for rows that
    hold several sequences (`spo_ray.data.collate_shared_prompts`).
    """
    per_token = scored_token_logps(model, inputs, rows, columns, labels, parameters)
    return sequence_sums(per_token, sequences, count), sequence_sums(torch.ones_like(per_token), sequences, count)


def shared_prefix(sequences: Tensor, count: int) -> Tensor:
    """For the scored tokens of a preference batch (sequence i < count/2 is pair i's chosen reply, count/2 + i its
    rejected one; each sequence's tokens in order): True where a token lies within the first min(|y_w|, |y_l|)
    tokens of its reply — LD-DPO's "public" part of the pair (Liu et al. 2024, arXiv:2409.06411)."""
    lengths = torch.bincount(sequences, minlength=count)
    order = torch.argsort(sequences, stable=True)
    ordinal = torch.empty_like(sequences)
    ordinal[order] = torch.arange(sequences.numel(), device=sequences.device) - (lengths.cumsum(0) - lengths)[
        sequences[order]]
    half = count // 2
    shared = torch.minimum(lengths[:half], lengths[half:])
    return ordinal < shared[sequences % half]


def fused_token_logps(model, head: torch.nn.Module, inputs: dict[str, Tensor], rows: Tensor, columns: Tensor,
                      labels: Tensor, parameters: dict | None = None, wpo: bool = False) -> Tensor:
    """The scored tokens' log-probs (M,) with the chunked head swapped in for `head` (the module docstring);
    `wpo`: (2, M) (`chunked_token_logps`)."""
    kwargs = {}
    if takes_logits_to_keep(model):  # the model hands the head only the columns some row needs
        kept = torch.unique(columns)
        kwargs["logits_to_keep"] = kept
        columns = torch.searchsorted(kept, columns)
    vocab = getattr(transformers_model(model).config, "vocab_size", None) or head.weight.size(0)

    def response_head(original, hidden):  # hidden: (N, kept columns, H) → (1, 1, M or 2M) token log-probs
        # Not a view: FSDP hooks the root's outputs for its backward and warns that a view's can be lost.
        per_token = chunked_token_logps(original, hidden[rows, columns], labels, chunk_positions(vocab), wpo)
        return per_token.reshape(1, 1, -1).clone()

    with _head_replaced(head, response_head):
        out = _call(model, parameters, **inputs, use_cache=False, **kwargs)
    return out.logits.reshape(2, -1) if wpo else out.logits.reshape(-1)


def full_logits_sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                               parameters: dict | None = None) -> tuple[Tensor, Tensor]:
    """`sequence_logps` through the model's full logits (`full_logits_token_logps`)."""
    with full_logits_only():
        return sequence_logps(model, input_ids, attention_mask, response_mask, parameters)


def full_logits_token_logps(model, inputs: dict[str, Tensor], rows: Tensor, columns: Tensor, labels: Tensor,
                            parameters: dict | None = None, wpo: bool = False) -> Tensor:
    """The scored tokens' log-probs (M,) from the model's full logits from the first scoring column on
    (transformers' `logits_to_keep` where the model takes it): (N, T', V) logits at once. `wpo`: (2, M)."""
    width = inputs["input_ids"].size(1)
    start = int(columns.min()) if columns.numel() else 0
    keep = {"logits_to_keep": width - start} if start and takes_logits_to_keep(model) else {}
    out = _call(model, parameters, **inputs, use_cache=False, **keep)
    offset = width - out.logits.size(1)  # the positions left out of the logits (0 or start)
    logits = _as_float32(out.logits[rows, columns - offset])
    logps = -F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([logps, wpo_aligned_logps(logits, logps)]) if wpo else logps


#: Attention implementations that apply a custom 4D mask as given (flash attention takes none, flex attention
#: a BlockMask); and the model types whose transformers attention does so, checked by tests/test_prefix_sharing.py.
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")
PREFIX_SHARING_MODEL_TYPES = ("llama", "gpt2", "qwen2", "mistral")


def prefix_sharing_unsupported(model, longest_row: int, model_types=PREFIX_SHARING_MODEL_TYPES) -> str | None:
    """Why `model` cannot run `spo_ray.data.collate_shared_prompts` batches (rows up to `longest_row` tokens)
    with the plain rows' log-probs, or None when it can: it must be a transformers causal LM of one of
    `model_types` (None: any) whose attention applies a custom mask, and no sliding window may cut a row
    (the custom mask replaces the window's)."""
    inner = transformers_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        return "the model is not a transformers model"
    if model_types is not None and config.model_type not in model_types:
        return (f"tested on model types {', '.join(model_types)}; this model is {config.model_type!r} "
                f"(set it to true to use it anyway)")
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in CUSTOM_MASK_ATTENTION:
        return f"attention {implementation!r} takes no custom mask (sdpa and eager do)"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and longest_row > window:
        return f"the model's sliding window ({window} tokens) is shorter than the longest shared row ({longest_row})"
    return None


def attention_mask_for(model, visible: Tensor) -> Tensor:
    """A (B, 1, T, T) boolean mask (True: may attend) in the form `model`'s attention takes a 4D mask as
    given: boolean for SDPA, additive (0 or the float32 minimum) for eager attention, which adds it to the
    scores."""
    config = getattr(transformers_model(model), "config", None)
    if (getattr(config, "_attn_implementation", None) or "eager") != "eager":
        return visible
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, torch.finfo(torch.float32).min)


def _call(model, parameters: dict | None, **kwargs):
    if parameters is None:
        return model(**kwargs)
    from torch.func import functional_call
    return functional_call(model, parameters, args=(), kwargs=kwargs)


def concatenated_forward(model, batch: dict[str, Tensor], wpo: bool = False) -> dict[str, Tensor]:
    """Chosen and rejected log-probs of a preference batch from one forward pass.

    Returns `chosen_logps`, `rejected_logps` (summed over response tokens), `chosen_avg_logps`,
    `rejected_avg_logps` (their per-token means), `chosen_shared_logps`, `rejected_shared_logps` (summed over the
    first min(|y_w|, |y_l|) tokens of each reply: LD-DPO's public part, `shared_prefix`) and `chosen_lengths`,
    `rejected_lengths`, each (B,). `wpo`: also `chosen_wpo_logps`, `rejected_wpo_logps`, the per-token means of
    WPO's aligned log-probs (`wpo_aligned_logps`; no gradient).
    """
    if "pair_attention" in batch:  # one row a pair, its prompt shared (spo_ray.data.collate_shared_prompts)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                  "attention_mask": attention_mask_for(model, batch["pair_attention"])}
        rows, columns, labels = batch["score_rows"], batch["score_columns"], batch["score_labels"]
        sequences, count = batch["score_sequences"], 2 * batch["input_ids"].size(0)
    else:
        inputs, rows, columns, labels = _row_scoring(batch["input_ids"], batch["attention_mask"],
                                                     batch["response_mask"])
        sequences, count = rows, batch["input_ids"].size(0)
    per_token = scored_token_logps(model, inputs, rows, columns, labels, wpo=wpo)
    if wpo:
        return pair_views(per_token[0], sequences, count, aligned=per_token[1].detach())
    return pair_views(per_token, sequences, count)


def pair_views(per_token: Tensor, sequences: Tensor, count: int, aligned: Tensor | None = None) -> dict[str, Tensor]:
    """`concatenated_forward`'s outputs from the scored tokens' log-probs (M,), the sequence each counts for
    (i < count/2: pair i's chosen reply, count/2 + i: its rejected one; each sequence's tokens in order) and,
    for WPO, their aligned log-probs (`wpo_aligned_logps`)."""
    sums = sequence_sums(per_token, sequences, count)
    counts = sequence_sums(torch.ones_like(per_token), sequences, count)
    shared = sequence_sums(per_token * shared_prefix(sequences, count), sequences, count)
    half = count // 2
    averages = sums / counts.clamp(min=1)
    out = {
        "chosen_logps": sums[:half], "rejected_logps": sums[half:],
        "chosen_avg_logps": averages[:half], "rejected_avg_logps": averages[half:],
        "chosen_shared_logps": shared[:half], "rejected_shared_logps": shared[half:],
        "chosen_lengths": counts[:half], "rejected_lengths": counts[half:],
    }
    if aligned is not None:
        means = sequence_sums(aligned, sequences, count) / counts.clamp(min=1)
        out.update(chosen_wpo_logps=means[:half], rejected_wpo_logps=means[half:])
    return out


@torch.no_grad()
def response_logp_per_token(model, rows: list[tuple[list[int], list[int]]], pad_id: int,
                            max_tokens: int | None = None, batch_size: int = 128) -> float:
    """Σ log π(response) / Σ |response| over (prompt ids, response ids) rows: the per-token log-prob of a set
    of reference answers (e.g. held-out solutions, for capability retention). Shortest rows first, in batches
    of at most `batch_size` rows and `max_tokens` padded tokens (`spo_ray.data.budget_batches`)."""
    from spo_ray.data import budget_batches, collate_rows

    device = next(model.parameters()).device
    total, tokens = 0.0, 0.0
    for indices in budget_batches([len(p) + len(r) for p, r in rows], batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate_rows([rows[i] for i in indices], pad_id).items()}
        sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        total, tokens = total + float(sums.sum()), tokens + float(counts.sum())
    return total / max(tokens, 1.0)
