"""Prefix sharing (spo_ray.data.collate_shared_prompts): one row a pair, the prompt once, gives the separate rows'
log-probs and gradients.

The reference is computed independently of the shared layout: the model's full logits over `collate_pairs`'
chosen and rejected rows, log-softmax, gathered at the reply tokens (test_chunked_logprobs' helpers), in
float32 and with the model in float64 (the oracle); "equal" is conftest's assert_as_accurate_as_float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import spo_ray.logprobs as logprobs
from conftest import FORWARD_ROUNDINGS, assert_as_accurate_as_float32, rounding_tolerance, run_gloo_workers, tiny_run
from spo_ray.config import ConfigError, RunConfig
from spo_ray.data import PairDataset, TokenizedPair, collate_pairs, collate_shared_prompts, length_sorted_batches
from spo_ray.logprobs import concatenated_forward, prefix_sharing_unsupported
from spo_ray.reference import compute_reference_logps
from spo_ray.trainer import WorkerContext, shares_prompts
from test_chunked_logprobs import (PAD, VOCAB_SIZE, _distributed_worker, assert_close_gradients, full_logits_references,
                                   gpt2, gradients, llama, pairs)


def qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=PAD))


def mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, pad_token_id=PAD, sliding_window=64))


MODELS = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2, "mistral": mistral}


def assert_matches_separate_rows(model, out: dict, plain, plain_grads, exact, exact_grads, weights=None) -> None:
    """`concatenated_forward`'s output `out` over shared rows, and the gradients of Σ weights·log-probs, against
    the separate rows' float32 values and the float64 oracle (`full_logits_references`)."""
    got = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    (got * (1.0 if weights is None else weights)).sum().backward()
    assert_as_accurate_as_float32(got.detach(), plain, exact, "log-probs")
    assert_close_gradients(gradients(model), plain_grads, exact_grads)


def test_a_shared_row_on_a_literal_example():
    # Prompt [5, 6], chosen [7, 8, 9], rejected [10, 11]; a second pair of 4 tokens pads its row to 7.
    items = list(PairDataset([TokenizedPair([5, 6], [7, 8, 9], [10, 11]), TokenizedPair([5], [12], [13, 14])]))
    batch = collate_shared_prompts(items, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11], [5, 12, 13, 14, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    # The rejected reply continues from the prompt's end: the positions it has in its own row.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 1, 2, 0, 0, 0]]
    visible = batch["pair_attention"][0, 0].int().tolist()
    assert visible == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 0, 1, 0],   # rejected token 10: the prompt and itself, no chosen token
                       [1, 1, 0, 0, 0, 1, 1]]
    assert batch["pair_attention"][1, 0, 4:].int().tolist() == [[0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0],
                                                               [0, 0, 0, 0, 0, 0, 1]]  # padding: itself only
    scored = list(zip(batch["score_rows"].tolist(), batch["score_columns"].tolist(), batch["score_labels"].tolist(),
                      batch["score_sequences"].tolist()))
    # (row, position whose logits score, token, output): the prompt's last position scores both first tokens.
    assert scored == [(0, 1, 7, 0), (0, 2, 8, 0), (0, 3, 9, 0), (0, 1, 10, 2), (0, 5, 11, 2),
                      (1, 0, 12, 1), (1, 0, 13, 3), (1, 2, 14, 3)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_shared_prompt_logps_and_gradients_equal_the_separate_rows(name, attention):
    model = MODELS[name]()
    model.config._attn_implementation = attention
    items = list(PairDataset(pairs(6)))
    weights = torch.linspace(0.5, 1.5, 2 * len(items))
    plain, plain_grads, exact, exact_grads = full_logits_references(model, collate_pairs(items, PAD), weights)
    out = concatenated_forward(model, collate_shared_prompts(items, PAD))
    assert_matches_separate_rows(model, out, plain, plain_grads, exact, exact_grads, weights)
    expected = collate_pairs(items, PAD)["response_mask"][:, 1:].sum(-1).float()
    assert torch.equal(torch.cat([out["chosen_lengths"], out["rejected_lengths"]]), expected)


def test_chunked_head_and_full_logits_paths_score_shared_rows_alike(monkeypatch):
    """Checkpointed chunks of 3 positions, and the full-logits path (models with post-processed logits)."""
    model = llama()
    items = list(PairDataset(pairs(6)))
    plain, plain_grads, exact, exact_grads = full_logits_references(model, collate_pairs(items, PAD))
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 3)
    for context in (logprobs.full_logits_only, lambda: torch.enable_grad()):
        model.zero_grad(set_to_none=True)
        with context():
            out = concatenated_forward(model, collate_shared_prompts(items, PAD))
        assert_matches_separate_rows(model, out, plain, plain_grads, exact, exact_grads)


def test_lora_adapters_get_the_separate_rows_gradients_from_shared_rows():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    items = list(PairDataset(pairs(6)))
    plain, plain_grads, exact, exact_grads = full_logits_references(model, collate_pairs(items, PAD))
    assert plain_grads and all("lora" in name for name in plain_grads)
    assert prefix_sharing_unsupported(model, 64) is None  # peft's wrapper is seen through
    out = concatenated_forward(model, collate_shared_prompts(items, PAD))
    assert_matches_separate_rows(model, out, plain, plain_grads, exact, exact_grads)


def test_the_comparison_sees_a_rejected_reply_that_attends_to_the_chosen_one():
    """The mask is what keeps the replies apart: with it plainly causal, the rejected log-probs move and the
    comparison above fails."""
    model = llama()
    items = list(PairDataset(pairs(6)))
    plain, _, exact, _ = full_logits_references(model, collate_pairs(items, PAD))
    batch = collate_shared_prompts(items, PAD)
    width = batch["input_ids"].size(1)
    batch["pair_attention"] = batch["pair_attention"] | torch.ones(width, width, dtype=torch.bool).tril()
    with torch.no_grad():
        out = concatenated_forward(model, batch)
    with pytest.raises(AssertionError):
        assert_as_accurate_as_float32(torch.cat([out["chosen_logps"], out["rejected_logps"]]), plain, exact)


def test_no_grad_passes_budget_one_row_a_pair():
    # Shared rows of 6, 4 and 9 tokens; separate rows of 4, 3 and 6 (the longer side), two a pair.
    data = PairDataset([TokenizedPair([1, 2], [3, 4], [5, 6]), TokenizedPair([1], [2, 3], [4]),
                        TokenizedPair([1, 2, 3], [4, 5, 6], [7, 8, 9])])
    assert length_sorted_batches(data, 4, max_tokens=12, shared_prompts=True) == [[1, 0], [2]]  # 2 × 6 = 12
    assert length_sorted_batches(data, 4, max_tokens=12) == [[1], [0], [2]]  # 2 × 2 × 4 = 16 > 12
    assert length_sorted_batches(data, 4, max_tokens=27, shared_prompts=True) == [[1, 0, 2]]  # 3 × 9 = 27
    assert length_sorted_batches(data, 4, max_tokens=27) == [[1, 0], [2]]  # 2 × 3 × 6 = 36 > 27


def test_the_reference_pass_with_shared_prompts_gives_the_separate_rows_tables():
    model, data = llama(), PairDataset(pairs(6))
    plain = compute_reference_logps(model, data, PAD, batch_size=4)
    shared = compute_reference_logps(model, data, PAD, batch_size=4, shared_prompts=True)
    assert plain.keys() == shared.keys() and plain
    for name in plain:  # two float32 forwards of the same tokens, batched differently
        allowed = rounding_tolerance(plain[name].abs().max(), 2 * FORWARD_ROUNDINGS)
        assert (shared[name] - plain[name]).abs().max() <= allowed, name


# ---------------------------------------------------------------------------------------------------
# When the trainer shares prompts

def _config(**train) -> RunConfig:
    return RunConfig(**tiny_run(train=train))


def test_auto_shares_prompts_on_supported_models_and_true_insists():
    data = PairDataset(pairs(4))
    context = WorkerContext()
    assert shares_prompts(_config(), llama(), data, context)
    assert not shares_prompts(_config(prefix_sharing=False), llama(), data, context)
    flash = llama()
    flash.config._attn_implementation = "flash_attention_2"
    assert not shares_prompts(_config(), flash, data, context)
    with pytest.raises(ConfigError, match="^train.prefix_sharing: attention 'flash_attention_2' takes no custom mask"):
        shares_prompts(_config(prefix_sharing=True), flash, data, context)
    # A model type no test covers: auto leaves it alone, true runs it.
    other = llama()
    other.config.model_type = "olmo"
    assert not shares_prompts(_config(), other, data, context)
    assert shares_prompts(_config(prefix_sharing=True), other, data, context)
    one_step = RunConfig(**tiny_run(loss={"name": "spo", "spo_estimator": "one_step"}, train={"prefix_sharing": True}))
    with pytest.raises(ConfigError, match="^train.prefix_sharing: the one_step estimator"):
        shares_prompts(one_step, llama(), data, context)


def test_a_sliding_window_shorter_than_a_shared_row_turns_it_off():
    model = mistral()  # window 64
    assert prefix_sharing_unsupported(model, 64) is None
    assert "sliding window (64 tokens) is shorter than the longest shared row (65)" in prefix_sharing_unsupported(model, 65)
    assert prefix_sharing_unsupported(lambda **kwargs: None, 10) == "the model is not a transformers model"


# ---------------------------------------------------------------------------------------------------
# DDP and FSDP: two gloo workers with the whole shared batch each (chunks of 3 positions), against the separate
# rows in one process

@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp_workers_get_the_separate_rows_values_and_gradients(strategy, tmp_path):
    out_path = tmp_path / "rank0.pt"
    run_gloo_workers(_distributed_worker, (strategy, str(out_path), False, True), tmp_path)
    result = torch.load(out_path, weights_only=True)
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs()))
    plain, plain_grads, exact, exact_grads = full_logits_references(
        llama(), collate_pairs(list(PairDataset(pairs())), PAD), weights)
    assert_as_accurate_as_float32(result["logps"], plain, exact, "log-probs")
    assert_close_gradients({n.replace("_fsdp_wrapped_module.", ""): g for n, g in result["grads"].items()},
                           plain_grads, exact_grads)
