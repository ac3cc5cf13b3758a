"""Evaluators for the arithmetic task: greedy accuracy and the exact split of the answer probability mass.

The mass split is the paper's "catastrophic preference shift" measured rather than guessed: when DPO pushes
a mistaken answer down, where does its probability go — to the correct answer, to other known mistakes, to
other numbers, or out of the space of answers altogether? The answer space is finite, so the four masses are
computed exactly by scoring the digit tree level by level.

Both evaluators share one incremental decoder (`_Decoder`): prompts are left-padded, scored once, and every
continuation then costs one token per row on top of a key/value cache, which is what makes the 1 + 10 +
100 + 1000 prefixes per problem of 2-digit addition cheap on a CPU.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from spo_ray.logprobs import peft_base
from spo_ray.tasks.arithmetic import ArithmeticConfig, format_answer, max_answer_digits, parse_answer

MASS_KEYS = ("mass_correct", "mass_mistake", "mass_other", "mass_malformed")


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode and no gradients for the block; the model's previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Decoder:
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


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def max_response_tokens(cfg: ArithmeticConfig) -> int:
    """The longest response the task can expect, EOS included (working: at most 10 characters a column)."""
    working = 10 * cfg.max_digits + 1 if cfg.working else 0
    return working + max_answer_digits(cfg) + 1


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256):
    """Greedy continuations of each prompt, as token ids up to and including EOS (or `max_new_tokens`)."""
    eos_id = tokenizer.eos_token_id
    responses = []
    with _evaluating(model):
        for start in range(0, len(prompts), batch_size):
            decoder = _Decoder(model, _encode(tokenizer, prompts[start : start + batch_size]), tokenizer.pad_token_id)
            batch = [[] for _ in range(decoder.next_logprobs.shape[0])]
            finished = torch.zeros(len(batch), dtype=torch.bool)
            for step in range(max_new_tokens):
                next_ids = decoder.next_logprobs.argmax(dim=-1)
                for row in (~finished).nonzero().flatten().tolist():
                    batch[row].append(next_ids[row].item())
                finished |= next_ids.cpu() == eos_id
                if finished.all() or step == max_new_tokens - 1:
                    break
                decoder.append(next_ids)
            responses.extend(batch)
    return responses


def greedy_accuracy(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig, batch_size: int = 256,
                    max_new_tokens: int | None = None) -> float:
    """Share of problems whose greedy response, ended by EOS, parses to the correct answer (exact match).

    A response that has not emitted EOS within `max_new_tokens` (default: the longest possible response)
    counts as wrong, so accuracy and `mass_correct` judge the same event.
    """
    if not problems:
        return float("nan")
    max_new_tokens = max_new_tokens or max_response_tokens(cfg)
    responses = greedy_decode(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size)
    correct = 0
    for problem, ids in zip(problems, responses):
        if ids and ids[-1] == tokenizer.eos_token_id:
            correct += parse_answer(tokenizer.decode(ids[:-1]), cfg) == problem["answer"]
    return correct / len(problems)


def _answer_values(length: int, cfg: ArithmeticConfig) -> torch.Tensor:
    """For every digit string of `length` (index = the digits read in generation order as a base-10 number):
    the integer it states if it is well-formed (canonical for this config), else -1."""
    values = []
    for index in range(10**length):
        text = str(index).zfill(length)
        value = parse_answer(text, cfg)
        values.append(value if format_answer(value, cfg) == text else -1)
    return torch.tensor(values, dtype=torch.long)


def answer_mass_split(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig,
                      batch_size: int = 4096) -> dict[str, float]:
    """Exact probability of each kind of response, averaged over problems (each problem's four sum to 1).

    For a problem with answer y and error-model mistakes M, the response (the tokens after the prompt) is
    - `mass_correct`: the answer string of y followed by EOS;
    - `mass_mistake`: the answer string of some m in M followed by EOS;
    - `mass_other`: any other *well-formed* answer followed by EOS, well-formed meaning the canonical digit
      string of an integer with 1..L digits — no superfluous leading zero in the natural (most significant
      first) order, written reversed when `cfg.reverse_answer` — where L = `max_answer_digits(cfg)`;
    - `mass_malformed`: everything else (non-digits, leading zeros, too many digits, never ending): 1 minus
      the other three.

    Exact: the probability of every digit string of length n <= L is the product of its next-token
    probabilities, computed for all strings of length n in one batched step (10**n rows per problem on top
    of the prompt's key/value cache), then multiplied by P(EOS | string). `batch_size` bounds the rows of
    one step (at least one problem's 10**L). Needs `cfg.working == False`: with working the response space is
    not a small digit tree.
    """
    if cfg.working:
        raise ValueError("answer_mass_split needs working=False: responses with working have no finite digit tree")
    length = max_answer_digits(cfg)
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    eos_id = tokenizer.eos_token_id
    values_by_length = [_answer_values(n, cfg) for n in range(1, length + 1)]
    problems_per_batch = max(1, batch_size // 10**length)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, mistake, other
    with _evaluating(model):
        for start in range(0, len(problems), problems_per_batch):
            chunk = problems[start : start + problems_per_batch]
            answers = torch.tensor([p["answer"] for p in chunk])[:, None]
            width = max(1, max(len(p["mistakes"]) for p in chunk))
            known_mistakes = torch.full((len(chunk), width), -2)  # -2 matches no value
            for row, p in enumerate(chunk):
                known_mistakes[row, : len(p["mistakes"])] = torch.tensor(p["mistakes"], dtype=torch.long)
            decoder = _Decoder(model, _encode(tokenizer, [p["prompt"] for p in chunk]), tokenizer.pad_token_id)
            device = decoder.next_logprobs.device
            prefix_logps = torch.zeros(len(chunk), 1, dtype=torch.float64, device=device)
            for n, values in enumerate(values_by_length, start=1):
                # Children of every prefix: row (problem, prefix, digit), in that order.
                digit_logps = decoder.next_logprobs[:, digit_ids.to(device)].double()
                prefix_logps = (prefix_logps.reshape(-1, 1) + digit_logps).reshape(len(chunk), 10**n)
                decoder.repeat(10)
                decoder.append(digit_ids.to(device).repeat(decoder.last_position.shape[0] // 10))
                ended = (prefix_logps + decoder.next_logprobs[:, eos_id].double().reshape(len(chunk), -1)).exp().cpu()
                is_correct = values[None, :] == answers
                is_mistake = (values[None, :, None] == known_mistakes[:, None, :]).any(dim=-1) & ~is_correct
                is_other = (values[None, :] >= 0) & ~is_correct & ~is_mistake
                totals += torch.stack([(ended * mask).sum() for mask in (is_correct, is_mistake, is_other)])
    correct, mistake, other = (totals / len(problems)).tolist()
    return {
        "mass_correct": correct,
        "mass_mistake": mistake,
        "mass_other": other,
        "mass_malformed": 1.0 - correct - mistake - other,
    }


def evaluate_task(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig) -> dict[str, float]:
    """`{"accuracy", "mass_correct", "mass_mistake", "mass_other", "mass_malformed"}` on `problems`
    (the trainer logs them as `eval/accuracy`, `eval/mass_*`); the masses are left out with working."""
    metrics = {"accuracy": greedy_accuracy(model, tokenizer, problems, cfg)}
    if not cfg.working:
        metrics.update(answer_mass_split(model, tokenizer, problems, cfg))
    return metrics
