"""The chunked LM head (spo_ray.logprobs): log-probs, losses and gradients equal the full-logits computation.

The reference in every test is computed independently of `spo_ray.logprobs`: the model's full logits over
every position, log-softmax, gathered at the response tokens, once in float32 (the plain path) and once with
the model in float64 (the oracle). "Equal" is conftest's assert_as_accurate_as_float32: the chunked path is
no further from the oracle than the plain float32 path is, within a factor, on any CPU kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import spo_ray.logprobs as logprobs
from conftest import assert_as_accurate_as_float32, run_gloo_workers
from spo_ray.config import LossConfig
from spo_ray.data import PairDataset, TokenizedPair, collate_pairs
from spo_ray.logprobs import concatenated_forward, position_ids_from_mask
from spo_ray.losses import LOSSES
from spo_ray.trainer import batch_loss

VOCAB_SIZE = 300
PAD = 0


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=PAD, tie_word_embeddings=True))


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD))


def pairs(count: int = 4, seed: int = 0) -> list[TokenizedPair]:
    """Pairs with prompts of 1–12 tokens and responses of 1–9 (chosen and rejected of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()
    length = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    return [TokenizedPair(draw(length(1, 12)), draw(length(1, 9)), draw(length(1, 9))) for _ in range(count)]


def full_logits_logps(model, batch) -> torch.Tensor:
    """Summed response log-probs per row from the model's logits at every position (no logits_to_keep)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["response_mask"][:, 1:]).sum(-1)


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def full_logits_references(model, batch, weights=None):
    """(plain float32 log-probs, their gradients, float64 oracle log-probs, its gradients) of Σ weights·logps."""
    out = []
    for m in (model, copy.deepcopy(model).double()):
        m.zero_grad(set_to_none=True)
        logps = full_logits_logps(m, batch)
        (logps * (1.0 if weights is None else weights.to(logps.dtype))).sum().backward()
        out += [logps.detach(), gradients(m)]
    model.zero_grad(set_to_none=True)
    return tuple(out)


def assert_close_gradients(got: dict, plain: dict, exact: dict) -> None:
    assert got.keys() == plain.keys() == exact.keys() and got
    for name in exact:
        assert_as_accurate_as_float32(got[name], plain[name], exact[name], name)


@pytest.mark.parametrize("chunk", [1, 5, None], ids=["chunk1", "chunk5", "one-chunk"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("make_model", [llama, gpt2], ids=["llama", "gpt2"])
def test_chunked_logps_and_gradients_equal_the_full_logits(make_model, padding_side, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * chunk)
    model = make_model()
    batch = collate_pairs(list(PairDataset(pairs())), PAD, padding_side)
    weights = torch.linspace(0.5, 1.5, batch["input_ids"].size(0))  # every row's gradient counts differently

    plain, plain_grads, exact, exact_grads = full_logits_references(model, batch, weights)

    out = concatenated_forward(model, batch)
    got = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    (got * weights).sum().backward()
    assert_as_accurate_as_float32(got.detach(), plain, exact, "log-probs")
    assert_close_gradients(gradients(model), plain_grads, exact_grads)


def test_the_backward_keeps_no_vocabulary_wide_tensor(monkeypatch):
    """Training-step memory: what autograd saves for the backward holds no (positions × vocabulary) logits."""
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 4)
    model = llama()
    batch = collate_pairs(list(PairDataset(pairs(count=6))), PAD)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = concatenated_forward(model, batch)
    (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
    def vocabulary_wide(shape):  # logits (or their softmax) of more than one position
        return len(shape) >= 2 and shape[-1] == VOCAB_SIZE and torch.Size(shape[:-1]).numel() > 1

    assert saved and not [shape for shape in saved if vocabulary_wide(shape)]
    # The full-logits path does keep them: the check above would see it.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs.full_logits_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert [shape for shape in saved if vocabulary_wide(shape)]


def _loss_config(name: str) -> LossConfig:
    if name == "spo_one_step":
        return LossConfig(name="spo", spo_estimator="one_step", spo_inner_lr=0.5, beta=0.5)
    if name == "combine":
        return LossConfig(name=name, beta=0.5, combine={"dpo": 1.0, "sft": 1.0})
    return LossConfig(name=name, beta=0.5, nll_weight=0.3 if name == "dpo" else 0.0)


@pytest.mark.parametrize("loss", [*LOSSES, "spo_one_step"])
def test_every_loss_and_its_gradients_equal_the_full_logits_path(loss, monkeypatch):
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 3)
    batch = collate_pairs(list(PairDataset(pairs(count=4, seed=1))), PAD, "left")
    cfg = _loss_config(loss)

    def loss_and_grads(dtype):
        with torch.no_grad():
            reference = concatenated_forward(llama(seed=1).to(dtype), batch)
        model = llama().to(dtype)
        value, _ = batch_loss(cfg, concatenated_forward(model, batch), reference, step=5, model=model, batch=batch)
        value.backward()
        return value.detach(), gradients(model)

    chunked, chunked_grads = loss_and_grads(torch.float32)
    with logprobs.full_logits_only():  # every pass through the full logits
        full, full_grads = loss_and_grads(torch.float32)
        exact, exact_grads = loss_and_grads(torch.float64)
    assert_as_accurate_as_float32(chunked, full, exact, "loss")
    assert_close_gradients(chunked_grads, full_grads, exact_grads)


def test_lora_logps_and_adapter_gradients_equal_the_full_logits(monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * VOCAB_SIZE * 2)
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    batch = collate_pairs(list(PairDataset(pairs())), PAD)
    plain, plain_grads, exact, exact_grads = full_logits_references(model, batch)
    assert plain_grads and all("lora" in name for name in plain_grads)
    out = concatenated_forward(model, batch)
    got = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    got.sum().backward()
    assert_as_accurate_as_float32(got.detach(), plain, exact, "log-probs")
    assert_close_gradients(gradients(model), plain_grads, exact_grads)


# ---------------------------------------------------------------------------------------------------
# DDP and FSDP: two gloo workers on this CPU, each with the whole batch, against the full logits in one process

def _distributed_worker(rank, world_size, strategy, out_path, checkpointed=False, shared_prompts=False):
    """`shared_prompts`: the batch as one row a pair (tests/test_prefix_sharing.py)."""
    from spo_ray.data import collate_shared_prompts

    logprobs.LOGITS_CHUNK_BYTES = 4 * VOCAB_SIZE * 3
    torch.set_num_threads(1)
    items = list(PairDataset(pairs()))
    batch = collate_shared_prompts(items, PAD) if shared_prompts else collate_pairs(items, PAD, "left")
    model = llama()
    if checkpointed:  # what model.gradient_checkpointing (true, or auto when needed) does before wrapping
        from spo_ray.models import enable_activation_checkpointing
        enable_activation_checkpointing(model)
        model.train()
    if strategy == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from spo_ray.sharding import shard_model
        wrapped = shard_model(model, torch.device("cpu"))
    out = concatenated_forward(wrapped, batch)
    logps = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"logps": logps.detach(), "grads": grads}, out_path)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["", "activation-checkpointing"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp_workers_get_the_full_logits_values_and_gradients(strategy, checkpointed, tmp_path):
    """Also with activation checkpointing: the recomputed forward gives the same values and gradients."""
    out_path = tmp_path / "rank0.pt"
    run_gloo_workers(_distributed_worker, (strategy, str(out_path), checkpointed), tmp_path)
    result = torch.load(out_path, weights_only=True)

    model = llama()
    batch = collate_pairs(list(PairDataset(pairs())), PAD, "left")
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs()))
    plain, plain_grads, exact, exact_grads = full_logits_references(model, batch, weights)
    assert_as_accurate_as_float32(result["logps"], plain, exact, "log-probs")
    # Both workers saw the same batch, so the averaged gradient is the one-process gradient.
    assert_close_gradients({n.replace("_fsdp_wrapped_module.", ""): g for n, g in result["grads"].items()},
                           plain_grads, exact_grads)


def test_the_float64_oracle_comparison_rejects_an_error_float32_rounding_cannot_make():
    model = llama()
    batch = collate_pairs(list(PairDataset(pairs())), PAD)
    plain, _, exact, _ = full_logits_references(model, batch)
    assert_as_accurate_as_float32(plain, plain, exact)
    with pytest.raises(AssertionError, match="from the float64 oracle"):
        assert_as_accurate_as_float32(plain * (1 + 1e-4), plain, exact)  # 1e-4 relative: ~800 float32 eps
