"""`create_small_lm`; `load_causal_lm`: local folders, remote code off by default, one-line errors, dtype and LoRA."""

import json

import pytest
import torch

from spo_ray.config import ConfigError, ModelConfig
from spo_ray.data import TokenizedPair, collate_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.losses import preference_loss
from spo_ray.models import create_small_lm, load_causal_lm
from spo_ray.tasks.arithmetic import make_tokenizer

VOCAB = 40


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_model")
    create_small_lm(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=3).save_pretrained(folder)
    return folder


def preference_batch(seed=0, pairs=4):
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=generator).tolist()
    items = [(i, TokenizedPair(ids(5), ids(3), ids(4))) for i in range(pairs)]
    return collate_pairs(items, pad_token_id=0)


def test_default_llama_has_the_calibrated_size_and_depends_only_on_seed():
    vocab_size = len(make_tokenizer())
    model = create_small_lm(vocab_size)
    assert 0.85e6 < sum(p.numel() for p in model.parameters()) < 0.87e6  # MISSION §3: 0.86M
    state = torch.random.get_rng_state()
    again = create_small_lm(vocab_size)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    other = create_small_lm(vocab_size, seed=1)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_gpt2_architecture_runs():
    model = create_small_lm(25, arch="gpt2", hidden_size=32, num_layers=1, num_heads=2)
    assert model.config.model_type == "gpt2"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 25)
    with pytest.raises(ValueError, match="arch"):
        create_small_lm(25, arch="mamba")


def test_a_saved_config_created_model_loads_with_the_same_weights(saved_model):
    model = load_causal_lm(saved_model, ModelConfig())
    original = create_small_lm(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_a_missing_path_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"model.init: cannot load a causal LM from '.*no_such_model'"):
        load_causal_lm(tmp_path / "no_such_model", ModelConfig())


def test_dtype_and_gradient_checkpointing_options(saved_model):
    model = load_causal_lm(saved_model, ModelConfig(dtype="bfloat16", gradient_checkpointing=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # older transformers
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing and model.config.use_cache is False
    assert {p.dtype for p in load_causal_lm(saved_model, ModelConfig()).parameters()} == {torch.float32}


@pytest.fixture
def remote_code_model(tmp_path, saved_model, monkeypatch):
    """A model folder whose config asks for its own Python code; importing that code leaves a marker file."""
    folder = tmp_path / "remote"
    folder.mkdir()
    config = json.loads((saved_model / "config.json").read_text())
    config.update(model_type="marked_llama", architectures=["MarkedLlama"],
                  auto_map={"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedLlama"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((saved_model / "model.safetensors").read_bytes())
    marker = tmp_path / "remote_code_ran"
    (folder / "marked.py").write_text(
        "import os, pathlib\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "pathlib.Path(os.environ['SPO_RAY_TEST_MARKER']).write_text('ran')\n"
        "class MarkedConfig(LlamaConfig):\n    model_type = 'marked_llama'\n"
        "class MarkedLlama(LlamaForCausalLM):\n    config_class = MarkedConfig\n")
    monkeypatch.setenv("SPO_RAY_TEST_MARKER", str(marker))
    return folder, marker


def test_remote_code_does_not_run_unless_the_config_turns_it_on(remote_code_model):
    folder, marker = remote_code_model
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ConfigError, match=r"model.init: cannot load a causal LM from .*remote"):
        load_causal_lm(folder, ModelConfig())
    assert not marker.exists()
    model = load_causal_lm(folder, ModelConfig(trust_remote_code=True))
    assert marker.exists() and type(model).__name__ == "MarkedLlama"


def test_lora_training_changes_only_the_adapter_weights(saved_model):
    torch.manual_seed(0)
    model = load_causal_lm(saved_model, ModelConfig(lora={"r": 4, "alpha": 8}))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    named_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in named_trainable)

    batch = preference_batch()
    with torch.no_grad(), model.disable_adapter():  # the frozen base model is the reference
        reference = concatenated_forward(model, batch)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        policy = concatenated_forward(model, batch)
        losses, _ = preference_loss("dpo", policy["chosen_logps"], policy["rejected_logps"],
                                    reference["chosen_logps"], reference["rejected_logps"], beta=0.1)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()

    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "no weight changed"
    assert all("lora_" in name for name in changed), f"base weights changed: {sorted(changed)[:3]}"
    assert any("lora_B" in name for name in changed)  # B starts at zero: the adapter now does something
    base = [name for name in before if "lora_" not in name]
    assert len(base) > 10 and all(torch.equal(before[n], after[n]) for n in base)
