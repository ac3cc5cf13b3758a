"""Greedy decoding and sampling for the evaluators and the sampler: a batch of prompts on a key/value cache.

The prompts' common prefix (a chat template's system turn) is scored once for the whole batch, the rest of each
prompt once per prompt, and every continuation then costs one token per row on top of the cache, which is
what makes the arithmetic task's exact mass split (1 + 10 + 100 + 1000 prefixes per problem of 2-digit
addition), GSM8K's accuracy and the sampled pairs cheap on a CPU. `Decoder` is the incremental step they all
build on; `generate` runs it to the end of every row.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache

from spo_ray.logprobs import (PREFIX_SHARING_MODEL_TYPES, attention_mask_for, peft_base, prefix_sharing_unsupported,
                              takes_logits_to_keep)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no gradients for the block; the model's previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class RowCache(Cache):
    """Every layer's keys and values in buffers allocated once (rows × heads × columns × head size), filled
    column by column: a forward of n tokens per row writes columns [filled, filled + n) of the rows it runs.

    transformers' `DynamicCache` concatenates each layer's whole cache with the new column at every step and
    copies all of it again whenever a row leaves; here a step writes one column in place, and a row that leaves
    costs a copy only of the row moved into its place (`batch_select_indices`). Which columns a row may attend
    to is the caller's 4D mask: rows may hold padding columns.
    """

    def __init__(self, columns: int):
        super().__init__(layers=[])
        self.columns = columns
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled: list[int] = []
        self.rows = 0  # the buffers' first rows in use (rows that left are past them)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows, start = key_states.shape[0], self.filled[layer_idx] if layer_idx < len(self.keys) else 0
        end = start + key_states.shape[-2]
        if layer_idx == len(self.keys):
            shape = (rows, key_states.shape[1], max(self.columns, end), key_states.shape[-1])
            self.keys.append(key_states.new_empty(shape))
            self.values.append(value_states.new_empty(shape[:3] + value_states.shape[-1:]))
            self.filled.append(0)
        if end > self.keys[layer_idx].shape[2]:  # more columns than planned (a `Decoder` without max_new_tokens)
            for buffers in (self.keys, self.values):
                old = buffers[layer_idx]
                buffers[layer_idx] = torch.cat([old, torch.empty_like(old)], dim=2)
        self.rows = rows
        keys, values = self.keys[layer_idx][:rows], self.values[layer_idx][:rows]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.filled[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled[layer_idx] if layer_idx < len(self.filled) else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        for buffers in (self.keys, self.values):
            for layer, buffer in enumerate(buffers):
                buffers[layer] = buffer[: self.rows].repeat_interleave(repeats, dim=0)
        self.rows *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Row i becomes row `indices[i]`; only the rows that change place are copied, so dropping finished rows
        by moving the last rows into their places costs what the moved rows hold, not the whole cache."""
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().flatten()
        sources = indices[moved]
        for buffers in (self.keys, self.values):
            for layer, buffer in enumerate(buffers):
                filled = self.filled[layer]
                buffer[moved, :, :filled] = buffer[sources, :, :filled]
        self.rows = len(indices)


def common_prefix_length(prompt_ids: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own (the token whose
    next-token distribution starts the row)."""
    shortest = min(len(ids) for ids in prompt_ids)
    length = 0
    while length < shortest - 1 and all(ids[length] == prompt_ids[0][length] for ids in prompt_ids):
        length += 1
    return length


class Decoder:
    """A batch of prompts extended one token per row at a time on a key/value cache.

    The prompts' common prefix is scored once, in one row, and its cache copied to every row; the rest of each
    prompt is left-padded after it, so that every row's next-token position is the last column. Explicit
    position ids (counting only real tokens) make a row score exactly like its prompt alone. On models whose
    attention takes a custom 4D mask (`spo_ray.logprobs.prefix_sharing_unsupported`: Llama, GPT-2, Qwen2,
    Mistral under SDPA or eager attention) the cache is a `RowCache`; elsewhere (flash attention) transformers'
    `DynamicCache` under a padding mask.

    `next_logits` are the float32 logits of every row's next token; `next_logprobs` their log-softmax.
    `max_new_tokens` sizes the cache (more tokens may be appended; the cache then grows).
    """

    def __init__(self, model, prompt_ids: list[list[int]], pad_id: int, max_new_tokens: int = 0):
        self.model = model
        device = next(model.parameters()).device
        prefix = common_prefix_length(prompt_ids)
        width = max(len(ids) for ids in prompt_ids) - prefix
        columns = prefix + width + max_new_tokens
        self.row_cache = prefix_sharing_unsupported(model, columns, PREFIX_SHARING_MODEL_TYPES) is None
        # transformers 5 renamed `past_key_values` to `cache`; accept both so older versions work too.
        forward = peft_base(model).forward  # a peft wrapper's keyword arguments go to its base model
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        # Only the last position's logits are needed: the prompt's would be rows × width × vocabulary floats
        # (64 prompts of 40 tokens at a 49k vocabulary: 500 MB).
        self.keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        self.cache = RowCache(columns) if self.row_cache else DynamicCache()
        # Which columns of each row hold one of its tokens (the prompt, left-padded, then what was appended).
        self.valid = torch.zeros(len(prompt_ids), prefix + width, dtype=torch.bool, device=device)
        self.valid[:, :prefix] = True
        suffixes = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=device)
        for row, ids in enumerate(prompt_ids):
            own = ids[prefix:]
            suffixes[row, width - len(own):] = torch.tensor(own, device=device)
            self.valid[row, prefix + width - len(own):] = True
        positions = (self.valid.cumsum(1) - 1).clamp(min=0)
        if prefix:
            first = torch.tensor([prompt_ids[0][:prefix]], device=device)
            self._forward(first, positions[:1, :prefix], self.valid[:1, :prefix])
            self.cache.batch_repeat_interleave(len(prompt_ids))
        self.last_position = positions[:, -1]
        self.next_logits = self._forward(suffixes, positions[:, prefix:], self.valid)
        self._logprobs = None

    def _forward(self, input_ids, position_ids, valid) -> torch.Tensor:
        """Logits of the last column after feeding `input_ids` (rows × new columns) on the cache; `valid`: the
        columns each row may attend to, the new ones included (earlier ones are hidden from them by causality)."""
        mask = valid
        if self.row_cache:
            new = input_ids.shape[1]
            columns = torch.arange(valid.shape[1], device=valid.device)
            queries = columns[-new:, None]
            # causal, and a query always sees itself (a padding column attends to something, so no NaN arises)
            mask = attention_mask_for(self.model, (valid[:, None, None, :] & (columns <= queries))
                                      | (columns == queries))
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_arg: self.cache}, **self.keep)
        self.cache = out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]
        return out.logits[:, -1].float()

    @property
    def next_logprobs(self) -> torch.Tensor:
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self.next_logits, dim=-1)
        return self._logprobs

    def repeat(self, times: int) -> None:
        """Row r becomes rows r*times .. r*times+times-1 (one per child in the digit tree); `append` next."""
        self.cache.batch_repeat_interleave(times)
        self.valid = self.valid.repeat_interleave(times, dim=0)
        self.last_position = self.last_position.repeat_interleave(times, dim=0)
        self.next_logits = self.next_logits.repeat_interleave(times, dim=0)
        self._logprobs = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Row i becomes row `rows[i]`, every row not in `rows` leaves the batch and its cache: finished rows stop
        costing compute. Cheapest on a `RowCache` when rows keep their places (`fill_from_the_end`)."""
        self.cache.batch_select_indices(rows.to(self.valid.device))
        self.valid = self.valid[rows]
        self.last_position = self.last_position[rows]
        self.next_logits = self.next_logits[rows]
        self._logprobs = None

    def append(self, token_ids: torch.Tensor) -> None:
        """Feed one token per row; `next_logits` (and `next_logprobs`) are then the token after it."""
        self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], dim=1)
        self.last_position = self.last_position + 1
        self.next_logits = self._forward(token_ids[:, None], self.last_position[:, None], self.valid)
        self._logprobs = None


def fill_from_the_end(going: torch.Tensor) -> torch.Tensor:
    """The rows to keep (`going`, a boolean per row) as `Decoder.keep_rows` takes them: rows that stay in the
    first len(kept) places keep them, the last rows still going move into the places of those that ended."""
    kept = going.nonzero().flatten()
    order = torch.arange(len(kept), device=going.device)
    holes = (~going[: len(kept)]).nonzero().flatten()
    order[holes] = kept[kept >= len(kept)]
    return order


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def generate(model, prompt_ids: list[list[int]], pick, stop_ids: set[int], pad_id: int, max_new_tokens: int,
             copies: int = 1) -> list[tuple[list[int], bool]]:
    """Continue each prompt `copies` times (row r*copies+c is copy c of prompt r), one token per step chosen by
    `pick(next-token logits of the rows still going, which rows they are, step) -> token ids`: (token ids, up to
    and including the stop token that ended the row; whether one did within `max_new_tokens`) per row.

    A prompt is scored once whatever `copies` is (its cache is repeated), and a row that emits a stop token
    leaves the batch and its cache at once, so the rows still going are all that a step computes.
    """
    decoder = Decoder(model, prompt_ids, pad_id, max_new_tokens)
    decoder.repeat(copies)
    rows = decoder.next_logits.size(0)
    device = decoder.next_logits.device
    stop = torch.tensor(sorted(stop_ids), device=device)
    tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # which row each decoder row is
    for step in range(max_new_tokens):
        chosen = pick(decoder.next_logits, active, step)
        tokens[active, step] = chosen
        stopped = torch.isin(chosen, stop)
        if step == max_new_tokens - 1:
            ended[active] = stopped
            break
        if bool(stopped.any()):
            ended[active[stopped]] = True
            lengths[active[stopped]] = step + 1
            if bool(stopped.all()):
                break
            order = fill_from_the_end(~stopped)
            decoder.keep_rows(order)
            active, chosen = active[order], chosen[order]
        decoder.append(chosen)
    return [(ids[:length], done) for ids, length, done in zip(tokens.tolist(), lengths.tolist(), ended.tolist())]


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
                  stop_ids: set[int] | None = None):
    """Greedy continuations of each prompt, as token ids up to and including the first stop token (EOS by
    default; a chat model's end-of-turn token too, see `spo_ray.tasks.gsm8k`) or `max_new_tokens`."""
    stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    responses = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            rows = generate(model, encode_prompts(tokenizer, prompts[start : start + batch_size]),
                            lambda logits, rows, step: logits.argmax(dim=-1), stop_ids, tokenizer.pad_token_id,
                            max_new_tokens)
            responses.extend(ids for ids, _ in rows)
    return responses
