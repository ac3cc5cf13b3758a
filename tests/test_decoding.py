"""The decoder (spo_ray.decoding) against a plain greedy loop that recomputes every sequence from scratch, with
no cache and no padding: prompts that share a long prefix and differ in length, rows that end at different
steps and leave the batch, both cache kinds (`RowCache`, transformers' `DynamicCache`), SDPA and eager
attention, Llama and GPT-2."""

import pytest
import torch

import spo_ray.decoding as decoding
from conftest import naive_greedy
from spo_ray.decoding import Decoder, common_prefix_length, encode_prompts, fill_from_the_end, greedy_decode
from spo_ray.models import create_small_lm
from spo_ray.tasks.arithmetic import make_tokenizer

TOKENIZER = make_tokenizer()
# A shared "system turn", then questions of different lengths (as a chat template renders them).
PROMPTS = [f"Q: 1+2=?\nA:3\nQ: {question}=?\nA:" for question in ("4+5", "12+34", "7-3", "99+1", "5", "123-45")]


def float64_model(arch: str, attention: str = "sdpa"):
    """A tiny random float64 model (no argmax ties from rounding); large initial weights make what it says
    depend on the prompt (at the default scale it says the same whatever the prompt)."""
    ids = {key: getattr(TOKENIZER, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return create_small_lm(len(TOKENIZER), arch=arch, hidden_size=32, num_layers=2, num_heads=2, seed=3,
                           initializer_range=0.3, attn_implementation=attention, **ids).double().eval()


def stop_token_that_ends_rows_at_different_steps(model) -> set[int]:
    """Of the tokens the naive loop emits, the one that, as the stop token, ends the most distinct lengths."""
    continuations = [naive_greedy(model, TOKENIZER, p, 8, set()) for p in PROMPTS]

    def lengths(token):
        return {ids.index(token) + 1 if token in ids else len(ids) for ids in continuations}
    return {max(sorted(set(sum(continuations, []))), key=lambda token: len(lengths(token)))}


@pytest.mark.parametrize("arch, attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("row_cache", [True, False])
def test_greedy_decode_equals_a_plain_loop_without_cache(arch, attention, row_cache, monkeypatch):
    model = float64_model(arch, attention)
    if not row_cache:  # what a model whose attention takes no custom mask (flash attention) gets
        monkeypatch.setattr(decoding, "prefix_sharing_unsupported", lambda *args: "no custom mask")
    stop = stop_token_that_ends_rows_at_different_steps(model)
    expected = [naive_greedy(model, TOKENIZER, prompt, 8, stop) for prompt in PROMPTS]
    assert len({len(ids) for ids in expected}) > 2  # rows leave the batch at different steps
    assert greedy_decode(model, TOKENIZER, PROMPTS, 8, stop_ids=stop) == expected
    assert greedy_decode(model, TOKENIZER, PROMPTS, 8, batch_size=4, stop_ids=stop) == expected


def test_the_decoder_scores_the_shared_prefix_once_and_every_row_as_its_prompt_alone():
    model = float64_model("llama")
    prompt_ids = encode_prompts(TOKENIZER, PROMPTS)
    assert common_prefix_length(prompt_ids) == len(TOKENIZER("Q: 1+2=?\nA:3\nQ: ", add_special_tokens=False)["input_ids"])
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # each row keeps a token of its own
    with torch.no_grad():
        decoder = Decoder(model, prompt_ids, TOKENIZER.pad_token_id)
        decoder.repeat(2)
        decoder.keep_rows(torch.tensor([0, 11, 2, 3, 4, 5, 6, 7, 8, 9]))  # rows 1 and 10 leave, 11 takes 1's place
        appended = torch.arange(10) % 5 + 3
        decoder.append(appended)
        for row, source in enumerate([0, 11, 2, 3, 4, 5, 6, 7, 8, 9]):
            alone = torch.tensor([prompt_ids[source // 2] + [appended[row].item()]])
            expected = torch.log_softmax(model(alone).logits[0, -1], -1)
            # next_logits are float32: a log-softmax in float32 of values up to ~30, a few units of 2^-24 x 30
            torch.testing.assert_close(decoder.next_logprobs[row], expected.float(), rtol=0, atol=1e-5)


def test_finished_rows_are_replaced_by_the_last_rows_still_going():
    going = torch.tensor([True, False, True, False, True, True, False, True])
    # 5 rows stay: rows 0 and 2 keep their places, rows 5 and 7 move into the places of 1 and 3, row 4 stays.
    assert fill_from_the_end(going).tolist() == [0, 5, 2, 7, 4]
    assert fill_from_the_end(torch.tensor([False, True])).tolist() == [1]


def test_prompts_that_join_a_running_batch_continue_as_they_would_alone(monkeypatch):
    """Continuous batching: at most 3 rows at a time over 10 prompts, so prompts join while other rows run
    (`Decoder.admit`), a longer prompt joins a batch narrower than it (`RowCache.widen`) and rows are packed
    when the planned columns run out (`RowCache.gather_columns`); every row is still its prompt's greedy
    continuation by the plain loop."""
    model = float64_model("llama")
    prompts = PROMPTS + ["Q: 1+2=?\nA:3\nQ: 1+2+3+4+5+6+7+8+9+10+11+12+13=?\nA:", "Q: 2=?\nA:", "Q: 8-8=?\nA:",
                         "Q: 1+2=?\nA:3\nQ: 77+23=?\nA:"]
    stop = stop_token_that_ends_rows_at_different_steps(model)
    expected = [naive_greedy(model, TOKENIZER, prompt, 10, stop) for prompt in prompts]
    calls = {"admit": 0, "widen": 0, "gather_columns": 0}
    for cls, name in ((Decoder, "admit"), (decoding.RowCache, "widen"), (decoding.RowCache, "gather_columns")):
        def counted(*args, _original=getattr(cls, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(cls, name, counted)
    assert greedy_decode(model, TOKENIZER, prompts, 10, batch_size=3, stop_ids=stop) == expected
    assert all(count > 0 for count in calls.values()), calls


def test_rows_that_join_read_no_memory_nobody_wrote(monkeypatch):
    """A joining row's columns between its prompt and the shared next column are hidden from it by the mask,
    but attention still multiplies them by a weight of 0: a NaN there (memory reused from a freed tensor)
    would make the row's output NaN. Every fresh buffer is filled with NaN here, as reused memory may be."""
    model = float64_model("llama")
    prompts = PROMPTS + ["Q: 1+2=?\nA:3\nQ: 1+2+3+4+5+6+7+8+9+10+11+12+13=?\nA:", "Q: 2=?\nA:"]
    stop = stop_token_that_ends_rows_at_different_steps(model)
    expected = [naive_greedy(model, TOKENIZER, prompt, 10, stop) for prompt in prompts]
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *args, **kwargs: new_empty(self, *args, **kwargs)
                        .fill_(float("nan")))
    assert greedy_decode(model, TOKENIZER, prompts, 10, batch_size=3, stop_ids=stop) == expected
