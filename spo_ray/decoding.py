"""Greedy decoding for the evaluators of every source: a batch of prompts on a key/value cache.

Prompts are left-padded, scored once, and every continuation then costs one token per row on top of the
cache, which is what makes the arithmetic task's exact mass split (1 + 10 + 100 + 1000 prefixes per problem
of 2-digit addition) and GSM8K's accuracy cheap on a CPU. `Decoder` is the incremental step both build on.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from spo_ray.logprobs import peft_base


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
        self.cache = None
        self.next_logprobs = self._forward(input_ids, position_ids)

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        self.cache = out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def repeat(self, times: int) -> None:
        """Row r becomes rows r*times .. r*times+times-1 (one per child in the digit tree); `append` next."""
        self.cache.batch_repeat_interleave(times)
        self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)
        self.last_position = self.last_position.repeat_interleave(times, dim=0)

    def append(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns (and keeps) the log-probs of the token after it."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.last_position = self.last_position + 1
        self.next_logprobs = self._forward(token_ids[:, None], self.last_position[:, None])
        return self.next_logprobs


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
                  stop_ids: set[int] | None = None):
    """Greedy continuations of each prompt, as token ids up to and including the first stop token (EOS by
    default; a chat model's end-of-turn token too, see `spo_ray.tasks.gsm8k`) or `max_new_tokens`."""
    stop = torch.tensor(sorted(stop_ids if stop_ids is not None else {tokenizer.eos_token_id}))
    responses = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            decoder = Decoder(model, encode_prompts(tokenizer, prompts[start : start + batch_size]), tokenizer.pad_token_id)
            batch = [[] for _ in range(decoder.next_logprobs.shape[0])]
            finished = torch.zeros(len(batch), dtype=torch.bool)
            for step in range(max_new_tokens):
                next_ids = decoder.next_logprobs.argmax(dim=-1)
                for row in (~finished).nonzero().flatten().tolist():
                    batch[row].append(next_ids[row].item())
                finished |= torch.isin(next_ids.cpu(), stop)
                if finished.all() or step == max_new_tokens - 1:
                    break
                decoder.append(next_ids)
            responses.extend(batch)
    return responses
