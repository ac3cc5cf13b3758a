"""Response log-probs against the models' own cross-entropy; tokenization, truncation and batching of pairs.

"Against" is conftest's assert_as_accurate_as_float32: our float32 log-probs are no further from a float64
oracle than the model's own float32 cross-entropy is, within a factor, on any CPU kernel.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import assert_as_accurate_as_float32, rounding_tolerance
from spo_ray.data import (LengthGroupedSampler, PairDataset, TokenizedPair, collate_pairs, length_sorted_batches,
                          tokenize_pairs)
from spo_ray.logprobs import concatenated_forward, position_ids_from_mask, response_logps

VOCAB_SIZE = 40
PAD = 0


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


# Different prompt and response lengths in one batch; chosen and rejected differ in length too.
PAIRS = [
    TokenizedPair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9, 2], rejected_ids=[10, 2]),
    TokenizedPair(prompt_ids=[11, 12, 13, 14, 15, 16, 17], chosen_ids=[18, 2], rejected_ids=[19, 20, 21, 22, 2]),
    TokenizedPair(prompt_ids=[23], chosen_ids=[24, 25, 26, 27, 28, 29, 2], rejected_ids=[30, 2]),
]


def hf_response_logp(model, prompt: list[int], response: list[int]) -> float:
    """log π(response | prompt) from the model's own loss: one unpadded sequence, prompt labels at −100.

    `out.loss` is the mean token cross-entropy over the labelled (response) tokens, so the summed
    log-likelihood is −loss × their count.
    """
    input_ids = torch.tensor([prompt + response])
    labels = torch.tensor([[-100] * len(prompt) + response])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    return -out.loss.item() * len(response)


def float64_response_logp(model64, prompt: list[int], response: list[int]) -> float:
    """The oracle: log π(response | prompt) from a float64 copy's logits, log-softmaxed in float64 (the models'
    own loss upcasts logits to float32 only, so it cannot be one)."""
    input_ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model64(input_ids=input_ids).logits[0, len(prompt) - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


def expected_logps(model, pairs: list[TokenizedPair], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's own float32 cross-entropy, the float64 oracle) of each pair's `side` response."""
    model64 = copy.deepcopy(model).double()
    responses = [(p.prompt_ids, p.chosen_ids if side == "chosen" else p.rejected_ids) for p in pairs]
    return (torch.tensor([hf_response_logp(model, *r) for r in responses], dtype=torch.float64),
            torch.tensor([float64_response_logp(model64, *r) for r in responses], dtype=torch.float64))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_concatenated_forward_matches_the_models_own_cross_entropy(make_model, padding_side):
    model = make_model()
    batch = collate_pairs(list(PairDataset(PAIRS)), pad_token_id=PAD, padding_side=padding_side)
    with torch.no_grad():
        out = concatenated_forward(model, batch)

    for side in ("chosen", "rejected"):
        assert_as_accurate_as_float32(out[f"{side}_logps"], *expected_logps(model, PAIRS, side), side)
    assert out["chosen_lengths"].tolist() == [len(p.chosen_ids) for p in PAIRS]
    assert out["rejected_lengths"].tolist() == [len(p.rejected_ids) for p in PAIRS]


# Long prompts (the shortest has 6 tokens) and responses of different lengths: most columns score no response.
LONG_PROMPT_PAIRS = [
    TokenizedPair(prompt_ids=[5, 6, 7, 8, 9, 10, 11], chosen_ids=[12, 13, 2], rejected_ids=[14, 2]),
    TokenizedPair(prompt_ids=[15, 16, 17, 18, 19, 20], chosen_ids=[21, 2], rejected_ids=[22, 23, 24, 25, 2]),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_only_response_scoring_positions_go_through_the_lm_head(make_model, padding_side, monkeypatch):
    import spo_ray.logprobs as logprobs

    model = make_model()
    batch = collate_pairs(list(PairDataset(LONG_PROMPT_PAIRS)), pad_token_id=PAD, padding_side=padding_side)
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 3)  # chunks of 3 positions
    head_inputs = []
    real_chunk = logprobs._chunk_logps
    monkeypatch.setattr(logprobs, "_chunk_logps",
                        lambda head, hidden, labels: head_inputs.append(tuple(hidden.shape)) or real_chunk(head, hidden, labels))
    with torch.no_grad():
        out = concatenated_forward(model, batch)
    # 3 + 2 + 2 + 5 response tokens, each scored by exactly one position, 3 at a time.
    assert head_inputs == [(3, 32), (3, 32), (3, 32), (3, 32)]
    expected = {side: expected_logps(model, LONG_PROMPT_PAIRS, side) for side in ("chosen", "rejected")}
    for side, (hf, exact) in expected.items():
        assert_as_accurate_as_float32(out[f"{side}_logps"], hf, exact, side)
    # A callable that is not a module (no head to swap) gets full logits, with the same values.
    with torch.no_grad():
        full = concatenated_forward(lambda **kw: model(**kw), batch)
    assert_as_accurate_as_float32(full["chosen_logps"], *expected["chosen"], "full logits")
    assert model.get_output_embeddings().forward.__self__ is model.get_output_embeddings()  # the head is restored


def test_left_and_right_padding_give_the_same_logps():
    model = tiny_llama()
    items = list(PairDataset(PAIRS))
    with torch.no_grad():
        right = concatenated_forward(model, collate_pairs(items, PAD, "right"))
        left = concatenated_forward(model, collate_pairs(items, PAD, "left"))
        exact = concatenated_forward(copy.deepcopy(model).double(), collate_pairs(items, PAD, "right"))
    for key in right:
        if key.endswith("_lengths"):
            assert torch.equal(right[key], left[key]), key
        else:
            assert_as_accurate_as_float32(left[key], right[key], exact[key], key)


def test_averaged_logps_are_sums_over_response_lengths():
    model = tiny_llama()
    with torch.no_grad():
        out = concatenated_forward(model, collate_pairs(list(PairDataset(PAIRS)), PAD))
    lengths_c = torch.tensor([3.0, 2.0, 7.0])
    lengths_r = torch.tensor([2.0, 5.0, 2.0])
    assert torch.equal(out["chosen_lengths"], lengths_c)
    assert torch.equal(out["rejected_lengths"], lengths_r)
    # One float32 division of the same numbers: IEEE division rounds correctly on every CPU, so bit for bit.
    assert torch.equal(out["chosen_avg_logps"], out["chosen_logps"] / lengths_c)
    assert torch.equal(out["rejected_avg_logps"], out["rejected_logps"] / lengths_r)


def test_response_logps_counts_only_response_tokens_on_a_literal_example():
    # Uniform logits over 4 tokens: every scored token has log-prob −log 4.
    logits = torch.zeros(2, 5, 4)
    input_ids = torch.tensor([[1, 2, 3, 0, 0], [0, 1, 2, 3, 3]])
    response_mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
    sums, counts = response_logps(logits, input_ids, response_mask)
    assert counts.tolist() == [2.0, 2.0]
    # Two float32 roundings of log 4 (one per token) in a sum of 2 log 4.
    assert (sums.double() + 2 * math.log(4)).abs().max() <= rounding_tolerance(2 * math.log(4), roundings=2)


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_collate_stacks_chosen_over_rejected_and_marks_responses():
    batch = collate_pairs(list(PairDataset(PAIRS[:2])), pad_token_id=PAD, padding_side="left")
    # Rows: chosen 0 (6 tokens), chosen 1 (9), rejected 0 (5), rejected 1 (12, the widest).
    assert batch["input_ids"].shape == (4, 12)
    assert batch["input_ids"][0].tolist() == [PAD] * 6 + [5, 6, 7, 8, 9, 2]
    assert batch["attention_mask"][0].tolist() == [0] * 6 + [1] * 6
    assert batch["response_mask"][0].tolist() == [0] * 9 + [1, 1, 1]
    assert batch["input_ids"][2].tolist() == [PAD] * 7 + [5, 6, 7, 10, 2]
    assert batch["response_mask"][2].tolist() == [0] * 10 + [1, 1]
    assert batch["input_ids"][3].tolist() == [11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 2]
    assert batch["attention_mask"][3].tolist() == [1] * 12
    assert batch["index"].tolist() == [0, 1]


# -------------------------------------------------------------------------------------- tokenization

WORDS = ["a", "b", "c", "d", "e", "f", "x", "y", "z", "w", "v"]


def word_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer; with `with_bos` it puts <s> before every encoded text."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def test_tokenize_pairs_adds_bos_to_prompts_and_eos_to_responses():
    tok = word_tokenizer()
    pairs, stats = tokenize_pairs([{"prompt": "a b", "chosen": "x y", "rejected": "z"}], tok)
    assert pairs[0] == TokenizedPair(ids(tok, "<s> a b"), ids(tok, "x y </s>"), ids(tok, "z </s>"))
    assert (stats.pairs, stats.truncated) == (1, 0)


def test_tokenize_pairs_truncates_the_prompt_from_the_left_first():
    tok = word_tokenizer()
    # 6 prompt + 3 chosen tokens > 7: two prompt tokens go from the left, both responses stay whole.
    pairs, stats = tokenize_pairs([{"prompt": "a b c d e", "chosen": "x y", "rejected": "z"}], tok, max_length=7)
    assert pairs[0] == TokenizedPair(ids(tok, "b c d e"), ids(tok, "x y </s>"), ids(tok, "z </s>"))
    assert (stats.pairs, stats.truncated) == (1, 1)


def test_tokenize_pairs_then_cuts_responses_from_the_right_keeping_half_the_budget_for_the_prompt():
    tok = word_tokenizer()
    # Prompt 4 tokens, chosen 7, max_length 6: the prompt keeps max_length // 2 = 3 tokens (its end), and
    # both responses are cut from the right to the remaining 3 tokens; the shorter rejected one fits.
    pairs, stats = tokenize_pairs(
        [{"prompt": "a b c", "chosen": "x y z w v x", "rejected": "z w"}], tok, max_length=6)
    assert pairs[0] == TokenizedPair(ids(tok, "a b c"), ids(tok, "x y z"), ids(tok, "z w </s>"))
    assert max(len(pairs[0].prompt_ids) + len(r) for r in (pairs[0].chosen_ids, pairs[0].rejected_ids)) <= 6
    assert stats.truncated == 1


def test_tokenize_stats_count_only_the_truncated_pairs():
    tok = word_tokenizer()
    raw = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},                # 2 + 2: fits
        {"prompt": "a b c d e f", "chosen": "x", "rejected": "y"},      # 7 + 2: cut
        {"prompt": "a", "chosen": "x y z w v x", "rejected": "y"},      # 2 + 7: cut
        {"prompt": "a b", "chosen": "x y z w", "rejected": "y"},        # 3 + 5 = 8: fits exactly
    ]
    pairs, stats = tokenize_pairs(raw, tok, max_length=8)
    assert (stats.pairs, stats.truncated) == (4, 2)
    assert all(p.length <= 8 for p in pairs)
    assert pairs[3] == TokenizedPair(ids(tok, "<s> a b"), ids(tok, "x y z w </s>"), ids(tok, "y </s>"))
    # The short prompt (2 ≤ max_length // 2) is kept whole; the chosen response loses its EOS.
    assert pairs[2] == TokenizedPair(ids(tok, "<s> a"), ids(tok, "x y z w v x"), ids(tok, "y </s>"))


def test_tokenize_pairs_refuses_a_tokenizer_without_eos():
    tok = word_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize_pairs([{"prompt": "a", "chosen": "x", "rejected": "y"}], tok)


# ------------------------------------------------------------------------------------------- sampler


def _lengths(n: int = 23) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 50, (n,), generator=g).tolist()


@pytest.mark.parametrize("group_factor", [1, 2, 8])
def test_length_grouped_sampler_yields_every_index_once_per_epoch(group_factor):
    lengths = _lengths()
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, group_factor=group_factor, drop_last=False)
    for epoch in range(3):
        sampler.epoch = epoch
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= 4 for b in batches)
        assert len(sampler) == len(batches)


def test_length_grouped_sampler_is_reproducible_per_seed_and_epoch():
    lengths = _lengths()

    def order(seed, epoch=0):
        return list(LengthGroupedSampler(lengths, batch_size=4, seed=seed, drop_last=False, epoch=epoch))

    assert order(5) == order(5)
    assert order(5) != order(6)
    assert order(5, epoch=0) != order(5, epoch=1)


def test_length_grouped_sampler_groups_similar_lengths():
    lengths = _lengths()
    # One mega-batch covers the whole set, so every batch is a run of consecutive sorted lengths.
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, group_factor=8, drop_last=False)
    ranked = sorted(range(len(lengths)), key=lambda i: lengths[i])
    rank = {i: r for r, i in enumerate(ranked)}
    for batch in sampler:
        ranks = sorted(rank[i] for i in batch)
        assert ranks == list(range(ranks[0], ranks[0] + len(batch)))


def test_length_grouped_sampler_drop_last_keeps_only_full_batches():
    sampler = LengthGroupedSampler(_lengths(), batch_size=4, seed=0, group_factor=8, drop_last=True)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == 20


def test_length_sorted_batches_respect_the_pair_cap_and_the_token_budget():
    # Pair lengths (prompt + longer response): 4, 9, 5, 10, 3, 7 → sorted 3, 4, 5, 7, 9, 10 (indices 4, 0, 2, 5, 1, 3).
    lengths = [(2, 2), (5, 4), (3, 2), (6, 4), (1, 2), (4, 3)]
    dataset = PairDataset([TokenizedPair([7] * p, [8] * r, [9]) for p, r in lengths])
    assert length_sorted_batches(dataset, batch_size=4) == [[4, 0, 2, 5], [1, 3]]
    # 2 rows per pair: [3, 4, 5] pads to 3 × 2 × 5 = 30 ≤ 30 tokens; adding the 7 would make 56, and each
    # later pair with the one before it too much (2 × 2 × 9 = 36, 2 × 2 × 10 = 40).
    assert length_sorted_batches(dataset, batch_size=4, max_tokens=30) == [[4, 0, 2], [5], [1], [3]]
    assert length_sorted_batches(dataset, batch_size=4, max_tokens=40) == [[4, 0, 2], [5, 1], [3]]  # 2 × 2 × 9 = 36
    # A pair longer than the budget alone still gets a batch; every pair is in exactly one batch.
    assert length_sorted_batches(dataset, batch_size=8, max_tokens=10) == [[4], [0], [2], [5], [1], [3]]


# ---------------------------------------------------------------------------------------------------
# LD-DPO's shared-prefix sums and WPO's aligned log-probs (spo_ray.losses.ld_logps, wpo_weights)

def test_the_shared_prefix_is_the_first_min_length_tokens_of_each_reply():
    from spo_ray.logprobs import shared_prefix

    # Pair 0: chosen 3 tokens, rejected 2; pair 1: chosen 1, rejected 4. Sequences 0, 1 chosen; 2, 3 rejected,
    # interleaved as collate_shared_prompts lists them.
    sequences = torch.tensor([0, 0, 0, 2, 2, 1, 3, 3, 3, 3])
    assert shared_prefix(sequences, 4).tolist() == [True, True, False, True, True, True, True, False, False, False]


def float64_token_views(model64, pairs: list[TokenizedPair], side: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per reply: the float64 log-probs of its tokens and log Σ_v π(v)² at each, from one unpadded sequence."""
    views = []
    for pair in pairs:
        response = pair.chosen_ids if side == "chosen" else pair.rejected_ids
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([pair.prompt_ids + response])).logits[0]
        logp = torch.log_softmax(logits[len(pair.prompt_ids) - 1:-1], dim=-1)
        views.append((logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1),
                      (logp.exp() ** 2).sum(-1).log()))  # Σ_v π(v)² straight from the probabilities
    return views


@pytest.mark.parametrize("layout", ["right", "left", "shared"])
def test_shared_prefix_sums_and_wpo_logps_equal_a_float64_oracle(layout):
    """`chosen_shared_logps`: the first min(|y_w|, |y_l|) token log-probs summed; `chosen_wpo_logps`: the mean of
    log π(y_t) − log Σ_v π(v)² over the reply (WPO's aligned log-prob) — from a float64 model batched three
    ways, against the same quantities from each reply's own unpadded forward and plain softmax."""
    from spo_ray.data import collate_shared_prompts

    model64 = tiny_llama().double()
    items = list(PairDataset(PAIRS))
    batch = (collate_shared_prompts(items, PAD) if layout == "shared"
             else collate_pairs(items, pad_token_id=PAD, padding_side=layout))
    with torch.no_grad():
        out = concatenated_forward(model64, batch, wpo=True)
    chosen, rejected = (float64_token_views(model64, PAIRS, side) for side in ("chosen", "rejected"))
    for side, views in (("chosen", chosen), ("rejected", rejected)):
        shared = torch.stack([logp[:min(len(c[0]), len(r[0]))].sum() for (logp, _), c, r in zip(views, chosen, rejected)])
        wpo = torch.stack([(logp - log_sum_sq).mean() for logp, log_sum_sq in views])
        scale = max(abs(v[0]).sum() for v in views) + max(abs(v[1]).sum() for v in views)
        tolerance = rounding_tolerance(scale, 64, torch.float64)  # two float64 forwards, batched differently
        assert (out[f"{side}_shared_logps"] - shared).abs().max() <= tolerance, side
        assert (out[f"{side}_wpo_logps"] - wpo).abs().max() <= tolerance, side
    # The shared part is a proper part: each pair's longer reply has tokens past it, the shorter one none.
    for i, pair in enumerate(PAIRS):
        longer = "chosen" if len(pair.chosen_ids) > len(pair.rejected_ids) else "rejected"
        shorter = "rejected" if longer == "chosen" else "chosen"
        assert abs(out[f"{longer}_shared_logps"][i] - out[f"{longer}_logps"][i]) > 1e-3
        assert out[f"{shorter}_shared_logps"][i] == out[f"{shorter}_logps"][i]


def test_wpo_outputs_leave_the_log_probs_and_their_gradient_bit_for_bit(monkeypatch):
    """Several checkpointed chunks, with gradients: asking for WPO's aligned log-probs computes them from the same
    logits without touching the log-probs or what flows back through them; they carry no gradient themselves."""
    import spo_ray.logprobs as logprobs

    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 3)  # chunks of 3 positions
    batch = collate_pairs(list(PairDataset(PAIRS)), pad_token_id=PAD, padding_side="right")
    results = {}
    for wpo in (False, True):
        model = tiny_llama().train()
        out = concatenated_forward(model, batch, wpo=wpo)
        (out["chosen_logps"].sum() - 0.5 * out["rejected_shared_logps"].sum()).backward()
        results[wpo] = out, [p.grad for p in model.parameters()]
    (plain, plain_grads), (with_wpo, wpo_grads) = results[False], results[True]
    for key in plain:
        assert torch.equal(plain[key], with_wpo[key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, wpo_grads))
    assert not with_wpo["chosen_wpo_logps"].requires_grad
    assert torch.isfinite(with_wpo["chosen_wpo_logps"]).all()
