"""Greedy decoding for the evaluators of every source: a batch of prompts on a key/value cache.

Prompts are left-padded, scored once, and every continuation then costs one token per row on top of the
cache, which is what makes the arithmetic task's exact mass split (1 + 10 + 100 + 1000 prefixes per problem
of 2-digit addition) and GSM8K's accuracy cheap on a CPU. `Decoder` is the incremental step both build on.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from spo_ray.logprobs import peft_base, takes_logits_to_keep


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


class Decoder:
    """A batch of prompts, left-padded, extended one token per row at a time on a key/value cache.

    Left padding keeps every row's next-token position at the end; explicit position ids (counting only
    real tokens) make a padded row score exactly like the same prompt alone.
    """

    def __init__(self, model, prompt_ids: list[list[int]], pad_id: int):
        self.model = model
        device = next(model.parameters()).device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, device=device)
            self.attention_mask[row, width - len(ids) :] = 1
        position_ids = (self.attention_mask.cumsum(1) - 1).clamp(min=0)
        self.last_position = position_ids[:, -1]
        # transformers 5 renamed `past_key_values` to `cache`; accept both so older versions work too.
        forward = peft_base(model).forward  # a peft wrapper's keyword arguments go to its base model
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        # Only the last position's logits are needed: the prompt's would be rows × width × vocabulary floats
        # (64 prompts of 40 tokens at a 49k vocabulary: 500 MB).
        self.keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        self.cache = None
        self.next_logprobs = self._forward(input_ids, position_ids)

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
            **self.keep,
        )
        self.cache = out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def repeat(self, times: int) -> None:
        """Row r becomes rows r*times .. r*times+times-1 (one per child in the digit tree); `append` next."""
        self.cache.batch_repeat_interleave(times)
        self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)
        self.last_position = self.last_position.repeat_interleave(times, dim=0)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (indices, in order) from the batch and its cache: finished rows stop
        costing compute."""
        self.cache.batch_select_indices(rows.to(self.attention_mask.device))
        self.attention_mask = self.attention_mask[rows]
        self.last_position = self.last_position[rows]

    def append(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns (and keeps) the log-probs of the token after it."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.last_position = self.last_position + 1
        self.next_logprobs = self._forward(token_ids[:, None], self.last_position[:, None])
        return self.next_logprobs


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def generate(model, prompt_ids: list[list[int]], pick, stop_ids: set[int], pad_id: int, max_new_tokens: int,
             copies: int = 1) -> list[tuple[list[int], bool]]:
    """Continue each prompt `copies` times (row r*copies+c is copy c of prompt r), one token per step chosen by
    `pick(next-token log-probs of the rows still going) -> token ids`: (token ids, up to and including the
    stop token that ended the row; whether one did within `max_new_tokens`) per row.

    A prompt is scored once whatever `copies` is (its cache is repeated), and a row that emits a stop token
    leaves the batch and its cache at once, so the rows still going are all that a step computes.
    """
    decoder = Decoder(model, prompt_ids, pad_id)
    decoder.repeat(copies)
    logprobs = decoder.next_logprobs.repeat_interleave(copies, dim=0)  # `repeat` copies the cache, not these
    stop = torch.tensor(sorted(stop_ids), device=logprobs.device)
    active = torch.arange(logprobs.size(0), device=logprobs.device)  # which row each decoder row is
    tokens: list[list[int]] = [[] for _ in range(logprobs.size(0))]
    ended = [False] * logprobs.size(0)
    for step in range(max_new_tokens):
        chosen = pick(logprobs)
        stopped = torch.isin(chosen, stop)
        for row, token, done in zip(active.tolist(), chosen.tolist(), stopped.tolist()):
            tokens[row].append(token)
            ended[row] = done
        if step == max_new_tokens - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            going = (~stopped).nonzero().flatten()
            decoder.keep_rows(going)
            active, chosen = active[going], chosen[going]
        logprobs = decoder.append(chosen)
    return list(zip(tokens, ended))


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
                  stop_ids: set[int] | None = None):
    """Greedy continuations of each prompt, as token ids up to and including the first stop token (EOS by
    default; a chat model's end-of-turn token too, see `spo_ray.tasks.gsm8k`) or `max_new_tokens`."""
    stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    responses = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            rows = generate(model, encode_prompts(tokenizer, prompts[start : start + batch_size]),
                            lambda logprobs: logprobs.argmax(dim=-1), stop_ids, tokenizer.pad_token_id,
                            max_new_tokens)
            responses.extend(ids for ids, _ in rows)
    return responses
