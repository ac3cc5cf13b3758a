"""The memory floors (spo_ray.memory) by hand, and a run whose pass cannot fit refused before its first step."""

import pytest
import torch
from transformers import LlamaConfig

import spo_ray.memory as memory
from conftest import tiny_run
from spo_ray.config import ConfigError, validate_run
from spo_ray.logprobs import LOGITS_CHUNK_BYTES
from spo_ray.trainer import train

CONFIG = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def test_forward_and_training_floors_by_hand():
    # no-grad: 100 tokens × (3 × 64 MLP + 2 × 32 residual) float32 values, plus one chunk of logits
    assert memory.forward_floor(CONFIG, 100) == 100 * 256 * 4 + LOGITS_CHUNK_BYTES
    # training: 2 layers × 100 tokens × (4 × 32 + 3 × 64) values, + gradients and 2 AdamW moments of 1,000
    # float32 weights, + a chunk of logits and its gradient
    assert memory.training_floor(CONFIG, 100, 1000) == 2 * 100 * 320 * 4 + 12 * 1000 + 2 * LOGITS_CHUNK_BYTES
    # checkpointed: each layer's input (32 values a token), and one layer's activations recomputed
    assert memory.training_floor(CONFIG, 100, 1000, checkpointed=True) == (
        2 * 100 * 32 * 4 + 100 * 320 * 4 + 12 * 1000 + 2 * LOGITS_CHUNK_BYTES)


def test_check_fits_refuses_only_what_exceeds_the_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * memory.GIB)
    memory.check_fits("reference.batch_tokens", "the reference pass", 10 * memory.GIB, torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        memory.check_fits("reference.batch_tokens", "the reference pass", 10 * memory.GIB + 1, torch.device("cpu"))
    assert str(error.value) == ("reference.batch_tokens: the reference pass needs at least 10.0 GiB, but 10.0 GiB "
                                "are available on cpu; lower it")


@pytest.mark.parametrize("reference_cache, key", [(True, "reference.batch_tokens"), (False, "train.eval_batch_tokens")])
def test_a_run_whose_pass_cannot_fit_is_refused_before_its_first_step(init_cache, monkeypatch, reference_cache, key):
    monkeypatch.setattr(memory, "available_bytes", lambda device: LOGITS_CHUNK_BYTES // 2)
    rows = []
    raw = tiny_run(reference={"cache": reference_cache})
    with pytest.raises(ConfigError, match=f"^{key}: the "):
        train(validate_run(raw), cache_dir=init_cache, report=lambda row, state: rows.append(row))
    assert rows == []
    # With room for the passes but not for the step's logits chunk and its gradient, the step is named.
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(1.9 * LOGITS_CHUNK_BYTES))
    with pytest.raises(ConfigError, match=r"^train.batch_size: a training step \(micro-batches of [\d,]+ tokens\)"):
        train(validate_run(tiny_run(reference={"cache": False})), cache_dir=init_cache, report=None)
