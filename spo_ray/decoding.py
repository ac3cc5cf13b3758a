"""Greedy decoding and sampling for the evaluators and the sampler: a batch of prompts on a key/value cache.

The prompts' common prefix (a chat template's system turn) is scored once for the whole batch, the rest of each
prompt once per prompt, and every continuation then costs one token per row on top of the cache, which is
what makes the arithmetic task's exact mass split (1 + 10 + 100 + 1000 prefixes per problem of 2-digit
addition), GSM8K's accuracy and the sampled pairs cheap on a CPU. `Decoder` is the incremental step they all
build on; `generate` runs it to the end of every row, with prompts joining the batch as rows leave it
(continuous batching: the batch stays full, so every step's forward is as large as the budget allows).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from spo_ray.decode_step import llama_step
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
    to is the caller's 4D mask: rows may hold padding columns, and a row's columns need not be its positions
    (rotary embeddings are applied before a key is cached, and position ids are explicit), which is what lets
    rows join (`take`) and be packed (`gather_columns`) while others run.

    `capacity`: rows the buffers hold room for (rows that join later, `take`).

    Buffers start as zeros, not uninitialized memory: a column hidden from a row by the mask still enters its
    attention with weight 0, and 0 × NaN (reused memory nobody wrote) is NaN.
    """

    def __init__(self, columns: int, capacity: int = 0):
        super().__init__(layers=[])
        self.columns = columns
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled: list[int] = []
        self.rows = 0  # the buffers' first rows in use (rows that left are past them)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows, start = key_states.shape[0], self.filled[layer_idx] if layer_idx < len(self.keys) else 0
        end = start + key_states.shape[-2]
        if layer_idx == len(self.keys):
            shape = (max(rows, self.capacity), key_states.shape[1], max(self.columns, end), key_states.shape[-1])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape[:3] + value_states.shape[-1:]))
            self.filled.append(0)
        self._room(layer_idx, rows, end)
        self.rows = rows
        keys, values = self.keys[layer_idx][:rows], self.values[layer_idx][:rows]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.filled[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def _room(self, layer: int, rows: int, columns: int) -> None:
        """Buffers of `layer` at least `rows` × `columns`, doubled where they are not (a `Decoder` without
        max_new_tokens, or more prompts joining than planned)."""
        for buffers in (self.keys, self.values):
            old = buffers[layer]
            if rows > old.shape[0]:
                old = buffers[layer] = torch.cat([old, old.new_zeros((max(rows, 2 * old.shape[0]) - old.shape[0],)
                                                                     + old.shape[1:])], dim=0)
            if columns > old.shape[2]:
                buffers[layer] = torch.cat([old, old.new_zeros(old.shape[:2] + (max(columns, 2 * old.shape[2])
                                                                                - old.shape[2],) + old.shape[3:])], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled[layer_idx] if layer_idx < len(self.filled) else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.rows * repeats
        for buffers in (self.keys, self.values):
            for layer, buffer in enumerate(buffers):
                repeated = buffer.new_zeros((max(rows, self.capacity),) + buffer.shape[1:])
                repeated[:rows] = buffer[: self.rows].repeat_interleave(repeats, dim=0)
                buffers[layer] = repeated
        self.rows = rows

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

    def take(self, other: "RowCache") -> None:
        """`other`'s rows join after this cache's rows, at the same columns as in `other` (its first
        `other.filled` ones; this cache must have at least as many: `widen`)."""
        joining = other.rows
        for layer in range(len(self.keys)):
            width = other.filled[layer]
            self._room(layer, self.rows + joining, width)
            for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
                mine[layer][self.rows : self.rows + joining, :, :width] = theirs[layer][:joining, :, :width]
        self.rows += joining

    def widen(self, columns: int) -> None:
        """Every row gets empty columns up to `columns` (for rows about to join with longer prompts)."""
        for layer in range(len(self.keys)):
            self._room(layer, self.rows, columns)
            self.filled[layer] = columns

    def gather_columns(self, order: torch.Tensor) -> None:
        """Row r's column c becomes its column `order[r, c]` (rows × new columns): packing each row's tokens
        into its first columns drops the columns every row has as padding."""
        rows, columns = order.shape
        for buffers in (self.keys, self.values):
            for layer, buffer in enumerate(buffers):
                index = order[:, None, :, None].expand(rows, buffer.shape[1], columns, buffer.shape[3])
                buffer[:rows, :, :columns] = buffer[:rows].gather(2, index)
        self.filled = [columns] * len(self.filled)


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
    `max_new_tokens` sizes the cache (more tokens may be appended; the cache then grows), `capacity` the rows
    it holds room for (more prompts may `admit`; on a `RowCache` only).
    """

    def __init__(self, model, prompt_ids: list[list[int]], pad_id: int, max_new_tokens: int = 0,
                 capacity: int = 0):
        self.model = model
        self.pad_id = pad_id
        device = next(model.parameters()).device
        prefix = common_prefix_length(prompt_ids)
        width = max(len(ids) for ids in prompt_ids) - prefix
        columns = self.columns = prefix + width + max_new_tokens
        self.row_cache = prefix_sharing_unsupported(model, columns, PREFIX_SHARING_MODEL_TYPES) is None
        self.head = plain_output_head(model) if self.row_cache else None
        # one token per row on a RowCache: the Llama family's step written out (spo_ray.decode_step) where it is
        # the model's own arithmetic, else transformers' forward
        self.step = llama_step(model) if self.head is not None else None
        # transformers 5 renamed `past_key_values` to `cache`; accept both so older versions work too.
        forward = peft_base(model).forward  # a peft wrapper's keyword arguments go to its base model
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        # Only the last position's logits are needed: the prompt's would be rows × width × vocabulary floats
        # (64 prompts of 40 tokens at a 49k vocabulary: 500 MB).
        self.keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        self.cache = RowCache(columns, capacity) if self.row_cache else DynamicCache()
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
        if self.head is None:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             **{self.cache_arg: self.cache}, **self.keep)
        else:  # the model's body, then its output matrix on the last position only
            out = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                        use_cache=True, **{self.cache_arg: self.cache})
        self.cache = out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]
        if self.head is None:
            return out.logits[:, -1].float()
        # W h^T rather than h W^T: the same products, but MKL's CPU kernel streams the 49k × 576 output matrix
        # of SmolLM2 1.5x (128 rows) to 1.7x (32 rows) faster that way round (benchmarks/decoding_step.py).
        return torch.mm(self.head, out.last_hidden_state[:, -1].t()).t().float()

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

    def admit(self, prompt_ids: list[list[int]], copies: int = 1) -> None:
        """More prompts join the batch, `copies` rows each (as `repeat` makes them), after the current rows:
        scored on a cache of their own (their common prefix once), then copied into this one at its first
        columns, with the columns between hidden from them; the next `append` extends every row at the same
        column. On a `RowCache` only (a row's columns need not be its positions)."""
        joining = Decoder(self.model, prompt_ids, self.pad_id)
        joining.repeat(copies)
        width = joining.valid.shape[1]
        if width > self.valid.shape[1]:
            self.cache.widen(width)
            self.valid = torch.nn.functional.pad(self.valid, (0, width - self.valid.shape[1]))
        self.cache.take(joining.cache)
        valid = torch.zeros(len(joining.valid), self.valid.shape[1], dtype=torch.bool, device=self.valid.device)
        valid[:, :width] = joining.valid
        self.valid = torch.cat([self.valid, valid])
        self.last_position = torch.cat([self.last_position, joining.last_position])
        self.next_logits = torch.cat([self.next_logits, joining.next_logits])
        self._logprobs = None

    def compact(self) -> None:
        """Each row's tokens packed into its first columns, in order, and the columns every row then has as
        padding dropped (a step's attention costs what the longest row holds, not how long the batch ran) —
        where that frees a quarter of the columns planned; else nothing (the cache grows instead)."""
        counts = self.valid.sum(dim=1)
        columns = int(counts.max())
        if self.valid.shape[1] - columns < self.columns / 4:
            return
        order = torch.sort((~self.valid).to(torch.uint8), dim=1, stable=True).indices[:, :columns]
        self.cache.gather_columns(order)
        self.valid = torch.arange(columns, device=counts.device) < counts[:, None]

    def append(self, token_ids: torch.Tensor) -> None:
        """Feed one token per row; `next_logits` (and `next_logprobs`) are then the token after it."""
        self.valid = torch.cat([self.valid, torch.ones_like(self.valid[:, :1])], dim=1)
        self.last_position = self.last_position + 1
        if self.step is not None:
            self.next_logits = self.step(self.cache, token_ids, self.last_position, self.valid)
        else:
            self.next_logits = self._forward(token_ids[:, None], self.last_position[:, None], self.valid)
        self._logprobs = None


def plain_output_head(model) -> torch.Tensor | None:
    """The output matrix of a causal LM whose next-token logits are exactly last hidden state × matrix^T (no
    bias, scaling or soft-capping; its body is `base_model`), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    plain = (isinstance(model, PreTrainedModel) and isinstance(head, torch.nn.Linear) and head.bias is None
             and model.base_model is not model
             and not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale"))
             and getattr(config, "logits_scaling", 1.0) == 1.0)
    return head.weight if plain else None


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
             copies: int = 1, max_rows: int | None = None) -> list[tuple[list[int], bool]]:
    """Continue each prompt `copies` times (row r*copies+c is copy c of prompt r), one token per step chosen by
    `pick(next-token logits of the rows still going, which rows they are, how many tokens each has) -> token
    ids`: (token ids, up to and including the stop token that ended the row; whether one did within
    `max_new_tokens`) per row.

    A prompt is scored once whatever `copies` is (its cache is repeated), and a row that emits a stop token
    leaves the batch and its cache at once, so the rows still going are all that a step computes. At most
    `max_rows` rows run at a time (default: all); prompts join in order as rows leave, a quarter of the batch
    at a time (`Decoder.admit`), so a batch is not left to its few longest rows while prompts wait. On a
    `DynamicCache` (flash attention) prompts join only an empty batch.
    """
    if max_new_tokens == 0:
        return [([], False)] * (len(prompt_ids) * copies)
    max_rows = max(copies, max_rows or len(prompt_ids) * copies)
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(stop_ids), device=device)
    tokens = torch.zeros(len(prompt_ids) * copies, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((len(tokens),), max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    active = torch.zeros(0, dtype=torch.long, device=device)  # which row each decoder row is
    steps = torch.zeros(0, dtype=torch.long, device=device)   # tokens each decoder row has so far
    decoder, waiting = None, 0  # the first prompt not yet in the batch
    while True:
        joining = min(len(prompt_ids) - waiting, (max_rows - len(active)) // copies)
        worth_it = joining * copies >= min(max(copies, max_rows // 4), (len(prompt_ids) - waiting) * copies)
        if joining and (not len(active) or (decoder.row_cache and worth_it)):
            group = prompt_ids[waiting : waiting + joining]
            if not len(active):
                decoder = Decoder(model, group, pad_id, max_new_tokens, capacity=max_rows)
                decoder.repeat(copies)
            else:
                decoder.admit(group, copies)
            active = torch.cat([active, torch.arange(waiting * copies, (waiting + joining) * copies, device=device)])
            steps = torch.cat([steps, torch.zeros(joining * copies, dtype=torch.long, device=device)])
            waiting += joining
        if not len(active):
            break
        chosen = pick(decoder.next_logits, active, steps)
        tokens[active, steps] = chosen
        stopped = torch.isin(chosen, stop)
        ended[active[stopped]] = True
        lengths[active[stopped]] = steps[stopped] + 1
        done = stopped | (steps == max_new_tokens - 1)
        if bool(done.all()):
            active, steps = active[:0], steps[:0]
            continue
        if bool(done.any()):
            order = fill_from_the_end(~done)
            decoder.keep_rows(order)
            active, chosen, steps = active[order], chosen[order], steps[order]
        if decoder.row_cache and decoder.valid.shape[1] >= decoder.columns:
            decoder.compact()  # the columns planned are used up: pack the rows rather than grow the cache
        decoder.append(chosen)
        steps = steps + 1
    return [(ids[:length], done) for ids, length, done in zip(tokens.tolist(), lengths.tolist(), ended.tolist())]


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
                  stop_ids: set[int] | None = None):
    """Greedy continuations of each prompt, as token ids up to and including the first stop token (EOS by
    default; a chat model's end-of-turn token too, see `spo_ray.tasks.gsm8k`) or `max_new_tokens`, at most
    `batch_size` rows at a time."""
    stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    with evaluating(model):
        rows = generate(model, encode_prompts(tokenizer, prompts), lambda logits, rows, steps: logits.argmax(dim=-1),
                        stop_ids, tokenizer.pad_token_id, max_new_tokens, max_rows=batch_size)
    return [ids for ids, _ in rows]
