"""The memory floors (spo_ray.memory) by hand, and a run whose pass cannot fit refused before its first step."""

import os
from pathlib import Path

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
    # every 3rd of 8 layers (0, 3, 6): 3 inputs kept, 5 layers' activations, and one layer recomputed
    eight = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8)
    assert memory.training_floor(eight, 100, 1000, checkpointed=3) == (
        3 * 100 * 32 * 4 + (5 + 1) * 100 * 320 * 4 + 12 * 1000 + 2 * LOGITS_CHUNK_BYTES)


def test_auto_checkpoints_the_fewest_layers_that_fit():
    """8 layers: room for the floor of 2 checkpointed layers (every 4th … every 7th layer: 0 and 4, …, 0 and
    7) picks every 7th, the least recompute; without partial checkpointing, every layer; room for the plain
    step, none."""
    eight = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8)
    floor = lambda every: memory.training_floor(eight, 100, 1000, checkpointed=every)
    assert floor(1) < floor(3) < floor(4) == floor(7) < floor(0) < floor(8)  # every 8th: one layer, plus a recompute
    assert memory.checkpointing_needed(eight, 100, 1000, 4, floor(4), some_layers=True) == 7
    assert memory.checkpointing_needed(eight, 100, 1000, 4, floor(4), some_layers=False) == 1
    assert memory.checkpointing_needed(eight, 100, 1000, 4, floor(1), some_layers=True) == 1
    assert memory.checkpointing_needed(eight, 100, 1000, 4, floor(0), some_layers=True) == 0
    assert memory.checkpointing_needed(eight, 100, 1000, 4, None, some_layers=True) == 0  # unknown: no check


def test_checkpointing_every_nth_layer_marks_those_layers_only():
    from transformers import LlamaForCausalLM

    from spo_ray.models import enable_activation_checkpointing
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                         num_attention_heads=2))
    if not memory.checkpoints_some_layers(model):
        pytest.skip("this transformers checkpoints all layers or none")
    enable_activation_checkpointing(model, every_n_layers=3)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i % 3 == 0 for i in range(8)]


# Peak RSS measured by benchmarks/logprob_memory.py on config-made models of SmolLM2-135M's shape (30 layers,
# hidden 576, MLP 1536, tied embeddings; docs/benchmarks.md), MiB: (reference pass at 16,384 tokens, training
# step of 8 pairs × 2 × 512 tokens) per vocabulary.
MEASURED_PEAKS_MIB = {49_152: (1_504, 12_497), 151_936: (1_729, 12_955)}


@pytest.mark.parametrize("vocab", list(MEASURED_PEAKS_MIB))
def test_the_floors_of_a_real_model_shape_sit_below_its_measured_peaks_but_not_far(vocab):
    """The check must never refuse a run that fits (floor ≤ what the run measurably used), and must still
    mean something (within 30% of it: the rest is Python, torch and the allocator)."""
    from transformers import LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        parameters = LlamaForCausalLM(config).num_parameters()
    weights = 4 * parameters
    reference_peak, step_peak = (mib * 2**20 for mib in MEASURED_PEAKS_MIB[vocab])
    reference_floor = memory.forward_floor(config, 16_384) + weights
    step_floor = memory.training_floor(config, 8 * 2 * 512, parameters) + weights
    assert 0.7 * reference_peak < reference_floor < reference_peak
    assert 0.7 * step_peak < step_floor < step_peak


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
    # (auto turns every lever on that applies — 8-bit states and checkpointing; the step in the backward not,
    # with the default gradient clipping — and the step still does not fit: no remedy left but smaller batches)
    with pytest.raises(ConfigError, match=r"^train.batch_size: a training step \(micro-batches of [\d,]+ tokens, "
                                          r"with train.optim adamw_bnb_8bit, model.gradient_checkpointing "
                                          r"\(every layer\)\) .*; lower it or raise train.grad_accum_steps$"):
        train(validate_run(tiny_run(reference={"cache": False})), cache_dir=init_cache, report=None)


def small_llama():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))


def checkpointing_on(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)


@pytest.mark.parametrize("setting, room, expected", [
    ("auto", "plain", False), ("auto", "between", True), (True, "plain", True), (False, "between", "refused")])
def test_auto_checkpointing_turns_on_only_when_a_step_fits_with_it_alone(monkeypatch, capsys, setting, room,
                                                                         expected):
    """Memory between the two floors of the step (the floors by hand above): auto turns activation
    checkpointing on and says so; with room for the plain step it stays off; false is refused naming the key."""
    from spo_ray.data import PairDataset, TokenizedPair
    from spo_ray.trainer import WorkerContext, fit_passes

    model = small_llama()
    pairs = PairDataset([TokenizedPair(list(range(1, 40)), list(range(40, 90)), list(range(90, 120)))] * 4)
    tokens = 2 * 4 * 89  # one micro-batch of the 4 pairs, chosen and rejected rows padded to 39 + 50 tokens
    trainable = sum(p.numel() for p in model.parameters())
    plain = memory.training_floor(model.config, tokens, trainable)
    checkpointed = memory.training_floor(model.config, tokens, trainable, checkpointed=True)
    assert checkpointed < plain
    available = plain if room == "plain" else (plain + checkpointed) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    config = validate_run(tiny_run(model={"gradient_checkpointing": setting}))
    if expected == "refused":
        with pytest.raises(ConfigError, match=r"^train.batch_size: .* or turn on model.gradient_checkpointing$"):
            fit_passes(config, model, pairs, pairs, [[0, 1, 2, 3]], WorkerContext())
        return
    fit_passes(config, model, pairs, pairs, [[0, 1, 2, 3]], WorkerContext())
    assert checkpointing_on(model) == (expected and setting == "auto")  # True: load_causal_lm's job, not this
    assert ("model.gradient_checkpointing (auto): on" in capsys.readouterr().out) == (setting == "auto" and expected)


@pytest.mark.parametrize("lora, every", [(False, 1), (True, 1), (False, 2)], ids=["full", "lora", "every-2nd-layer"])
def test_activation_checkpointing_leaves_the_loss_and_gradients_as_they_are(lora, every):
    """One DPO-style backward through the chunked log-probs with and without checkpointing (non-reentrant, so
    LoRA's adapters, whose layer inputs need no gradient, still get theirs): equal to float32 rounding."""
    import copy

    from spo_ray.data import TokenizedPair, collate_pairs
    from spo_ray.logprobs import concatenated_forward
    from spo_ray.models import enable_activation_checkpointing

    model = small_llama()
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    checkpointed = copy.deepcopy(model)
    if every > 1 and not memory.checkpoints_some_layers(checkpointed):
        pytest.skip("this transformers checkpoints all layers or none")
    enable_activation_checkpointing(checkpointed, every)
    model.train(), checkpointed.train()
    items = [(0, TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9])), (1, TokenizedPair([1, 10], [11, 12, 13, 14], [15]))]
    batch = collate_pairs(items, 0)
    grads = []
    for m in (model, checkpointed):
        out = concatenated_forward(m, batch)
        loss = -torch.nn.functional.logsigmoid(out["chosen_logps"] - out["rejected_logps"]).mean()
        trainable = [p for p in m.parameters() if p.requires_grad]
        grads.append((loss.detach(), torch.autograd.grad(loss, trainable)))
    (loss, plain), (loss_ckpt, recomputed) = grads
    assert all(g.abs().sum() > 0 for g in plain)
    # The recompute runs the same kernels on the same inputs: a float32 difference beyond a few ulps of the
    # largest gradient entry would be a different computation.
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=8 * torch.finfo(torch.float32).eps * loss.abs().item())
    for a, b in zip(recomputed, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=8 * torch.finfo(torch.float32).eps * b.abs().max().item())


def _auto_checkpointing_worker(rank, world_size, out_dir):
    """Rank 0 has room for the plain step, rank 1 only for the checkpointed one."""
    from spo_ray.data import PairDataset, TokenizedPair
    from spo_ray.trainer import WorkerContext, fit_passes

    model = small_llama()
    pairs = PairDataset([TokenizedPair(list(range(1, 40)), list(range(40, 90)), list(range(90, 120)))] * 4)
    trainable = sum(p.numel() for p in model.parameters())
    plain = memory.training_floor(model.config, 2 * 4 * 89, trainable)
    checkpointed = memory.training_floor(model.config, 2 * 4 * 89, trainable, checkpointed=True)
    memory.available_bytes = lambda device: plain if rank == 0 else (plain + checkpointed) // 2
    fit_passes(validate_run(tiny_run()), model, pairs, pairs, [[0, 1, 2, 3]],
               WorkerContext(rank=rank, world_size=world_size))
    (Path(out_dir) / f"rank{rank}").write_text(str(checkpointing_on(model)))


def test_every_worker_checkpoints_as_the_one_that_needs_it_most(tmp_path):
    """Under FSDP a checkpointed layer gathers its shards again in the backward: workers that decided apart
    would wait on each other's collectives. Rank 0 alone would not checkpoint; it does, as rank 1 must."""
    from conftest import run_gloo_workers
    run_gloo_workers(_auto_checkpointing_worker, (str(tmp_path),), tmp_path)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]


def _refusing_worker(rank, world_size, out_dir):
    """Rank 1 has half the checkpointed step's floor (less than its reference pass needs); rank 0 plenty."""
    from spo_ray.config import ConfigError
    from spo_ray.data import PairDataset, TokenizedPair
    from spo_ray.trainer import WorkerContext, fit_passes

    model = small_llama()
    pairs = PairDataset([TokenizedPair(list(range(1, 40)), list(range(40, 90)), list(range(90, 120)))] * 4)
    trainable = sum(p.numel() for p in model.parameters())
    checkpointed = memory.training_floor(model.config, 2 * 4 * 89, trainable, checkpointed=True)
    memory.available_bytes = lambda device: 100 * checkpointed if rank == 0 else checkpointed // 2
    try:
        fit_passes(validate_run(tiny_run()), model, pairs, pairs, [[0, 1, 2, 3]],
                   WorkerContext(rank=rank, world_size=world_size))
        outcome = "fits"
    except ConfigError as error:
        outcome = str(error)
    (Path(out_dir) / f"rank{rank}").write_text(outcome)


def test_a_batch_one_worker_cannot_fit_stops_every_worker_with_its_error(tmp_path):
    """Without the exchange, rank 0 would go on to its first collective and wait there for rank 1, gone."""
    from conftest import run_gloo_workers
    run_gloo_workers(_refusing_worker, (str(tmp_path),), tmp_path)
    outcomes = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("reference.batch_tokens: the reference pass (batches of ")


RETENTION_PROBE = """
import torch
from spo_ray.memory import release_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

blocks, keepers = [], []
for _ in range(300):  # 1 MiB blocks from the heap, each pinned in place by a small one
    blocks.append(torch.ones(2**18))
    keepers.append(torch.ones(2**12))
loaded = rss_mib()
del blocks
freed = rss_mib()
release_freed_memory()
print(loaded, freed, rss_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from Linux's /proc")
def test_releasing_freed_memory_gives_the_heaps_pages_back():
    """Between the training steps and the evaluation or probe, the trainer hands freed heap pages back
    (`release_freed_memory`), so those phases start from the memory in use. 300 MiB freed in 1 MiB blocks stay
    resident until then: glibc's thresholds fixed where its dynamic ones go after a step frees its activations
    (blocks up to 32 MiB from the heap, no trimming at free), and small live blocks pinning them in place."""
    import subprocess
    import sys

    if not memory.release_freed_memory():
        pytest.skip("no malloc_trim in this C library (not glibc): the release is a no-op there")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
    out = subprocess.run([sys.executable, "-c", RETENTION_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    loaded, freed, released = map(float, out)
    assert loaded - freed < 30, "glibc returned the freed blocks at free; the premise of the test is gone"
    assert freed - released > 270, (loaded, freed, released)  # 300 MiB, less the pages glibc keeps in its bins


def test_the_probe_and_the_evaluation_each_start_after_freed_memory_is_released(init_cache, monkeypatch):
    import spo_ray.trainer as trainer_module

    calls = []
    for name, label in (("release_freed_memory", "release"), ("gradient_terms", "probe"),
                        ("evaluate_pairs", "evaluation")):
        original = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, lambda *a, _original=original, _label=label, **k:
                            calls.append(_label) or _original(*a, **k))
    rows = []
    train(validate_run(tiny_run()), cache_dir=init_cache, report=lambda row, state: rows.append(row["step"]))
    # log_every = eval_every = probe_every = 3: every reported row (and step 0's, when asked) ran both phases
    assert rows and calls == ["release", "probe", "release", "evaluation"] * len(rows)


@pytest.mark.parametrize("reference", [{"cache": True}, {"cache": False}, {"sync": True}],
                         ids=["cached", "uncached", "synced"])
def test_a_reference_kept_beside_the_policy_counts_against_the_step(monkeypatch, reference):
    """Room for exactly the plain step: enough with the cached reference (its tables are read, the model gone),
    not when the reference stays loaded for every batch (reference.cache: false, TR-DPO's sync) — its weights,
    the policy's size here, come on top."""
    from spo_ray.data import PairDataset, TokenizedPair
    from spo_ray.trainer import WorkerContext, fit_passes

    model = small_llama()
    pairs = PairDataset([TokenizedPair(list(range(1, 40)), list(range(40, 90)), list(range(90, 120)))] * 4)
    trainable = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(memory, "available_bytes",
                        lambda device: memory.training_floor(model.config, 2 * 4 * 89, trainable))
    config = validate_run(tiny_run(model={"gradient_checkpointing": False}, reference=reference,
                                   train={"optim": "adamw_torch_fused"}))
    if reference == {"cache": True}:
        fit_passes(config, model, pairs, pairs, [[0, 1, 2, 3]], WorkerContext())
        return
    with pytest.raises(ConfigError, match=r"^train.batch_size: a training step"):
        fit_passes(config, model, pairs, pairs, [[0, 1, 2, 3]], WorkerContext())
    # With train.optim auto, 8-bit states (6 bytes a parameter fewer) make room for the reference's 4.
    auto = validate_run(tiny_run(model={"gradient_checkpointing": False}, reference=reference))
    assert fit_passes(auto, model, pairs, pairs, [[0, 1, 2, 3]], WorkerContext()).optim == "adamw_bnb_8bit"


# ---------------------------------------------------------------------------------------------------
# The memory levers: 8-bit states, the step in the backward, offloading — floors by hand, and auto's choice

def test_each_levers_floor_by_hand():
    activations, chunks = 2 * 100 * 320 * 4, 2 * LOGITS_CHUNK_BYTES
    floor = lambda **levers: memory.training_floor(CONFIG, 100, 100_000, largest_parameter=30_000,
                                                   levers=memory.Levers(**levers))
    assert floor() == activations + 4 * 100_000 + 8 * 100_000 + chunks
    # 8-bit: two one-byte moments a parameter and two float32 scales per block of 256 (⌈100,000 / 256⌉ = 391)
    assert floor(optim="adamw_bnb_8bit") == activations + 4 * 100_000 + 2 * 100_000 + 8 * 391 + chunks
    # in the backward: only the largest parameter's gradient at a time
    assert floor(in_backward=True) == activations + 4 * 30_000 + 8 * 100_000 + chunks
    # offloaded: one layer's activations on the device at a time
    assert floor(offloaded=True) == 100 * 320 * 4 + 4 * 100_000 + 8 * 100_000 + chunks


def train_settings(**values):
    from spo_ray.config import TrainConfig
    return TrainConfig(**{"max_grad_norm": None, **values})


EIGHT = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8)
TRAINABLE, LARGEST = 200_000, 20_000


def lever_floor(**levers) -> int:
    return memory.training_floor(EIGHT, 100, TRAINABLE, largest_parameter=LARGEST, levers=memory.Levers(**levers))


def choose(available: int, device: str = "cpu", checkpointing="auto", workers: int = 1, **train):
    return memory.choose_levers(EIGHT, 100, TRAINABLE, LARGEST, 4, available, train_settings(**train), checkpointing,
                                True, workers, device)


def test_auto_adds_levers_cheapest_first_until_the_step_fits_on_a_cpu():
    plain, in_bwd = lever_floor(), lever_floor(in_backward=True)
    assert choose(plain) == memory.Levers()  # fits as it is: nothing on
    assert choose(plain - 1) == memory.Levers(in_backward=True) and choose(in_bwd) == memory.Levers(in_backward=True)
    # below that, checkpointing (on a CPU before 8-bit), at the fewest layers that fit with the step in the backward
    two_layers = lever_floor(in_backward=True, checkpointed=7)
    assert choose(in_bwd - 1) == choose(two_layers) == memory.Levers(in_backward=True, checkpointed=7)
    every = lever_floor(in_backward=True, checkpointed=1)
    assert choose(every) == memory.Levers(in_backward=True, checkpointed=1)
    # below every layer checkpointed, 8-bit states, and checkpointing redone at the fewest layers that fit with them
    with_8bit = lever_floor(in_backward=True, optim="adamw_bnb_8bit", checkpointed=1)
    assert with_8bit < every
    fewest = next(n for n in (0, 8, 7, 6, 5, 4, 3, 2, 1)  # none, then the fewest layers recomputed first
                  if lever_floor(in_backward=True, optim="adamw_bnb_8bit", checkpointed=n) <= every - 1)
    assert choose(every - 1) == memory.Levers(in_backward=True, optim="adamw_bnb_8bit", checkpointed=fewest)
    assert choose(with_8bit - 1) == memory.Levers(in_backward=True, optim="adamw_bnb_8bit", checkpointed=1)  # all on


def test_on_a_gpu_8_bit_states_come_before_checkpointing():
    in_bwd = lever_floor(in_backward=True)
    assert choose(in_bwd - 1, device="cuda") == memory.Levers(in_backward=True, optim="adamw_bnb_8bit")
    assert choose(in_bwd - 1, device="cpu").optim == "adamw_torch_fused"


def test_auto_leaves_off_what_cannot_apply_and_what_the_config_fixed(monkeypatch):
    plain = lever_floor()
    # clipping, accumulation or two workers: no step in the backward; checkpointing instead
    for refused in ({"max_grad_norm": 1.0}, {"grad_accum_steps": 2}):
        assert not choose(plain - 1, **refused).in_backward and choose(plain - 1, **refused).checkpointed
    assert not choose(plain - 1, workers=2).in_backward
    # set, not auto: as given
    assert choose(plain - 1, optimizer_in_backward=False, checkpointing=False, device="cuda").optim == "adamw_bnb_8bit"
    assert choose(plain - 1, optimizer_in_backward=False, checkpointing=False,
                  optim="adamw_torch_fused") == memory.Levers()  # nothing left to turn on: the check will name it
    assert choose(10 * plain, optimizer_in_backward=True, optim="adamw_bnb_8bit") == memory.Levers(
        in_backward=True, optim="adamw_bnb_8bit")  # on where set, even with room to spare
    # without bitsandbytes, no 8-bit states
    monkeypatch.setattr(memory, "eight_bit_installed", lambda: False)
    assert choose(plain - 1, optimizer_in_backward=False, checkpointing=False, device="cuda") == memory.Levers()


def test_a_memory_budget_below_what_is_free_caps_the_check(monkeypatch):
    """The budget caps the trial's whole memory: what it leaves is the budget less what the process holds."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * memory.GIB)
    monkeypatch.setattr(memory, "in_use_bytes", lambda device: memory.GIB)
    memory.check_fits("train.batch_size", "a training step", 3 * memory.GIB, torch.device("cpu"), budget_gib=4.0)
    with pytest.raises(ConfigError) as error:
        memory.check_fits("train.batch_size", "a training step", 3 * memory.GIB + 1, torch.device("cpu"), budget_gib=4.0)
    assert str(error.value) == ("train.batch_size: a training step needs at least 3.0 GiB, but 3.0 GiB are available "
                                "on cpu within train.memory_budget (4.0 GiB, of which this process holds 1.0); lower it")
    assert memory.budgeted_available(torch.device("cpu"), 20.0) == 10 * memory.GIB  # a budget above: what is free
    assert memory.budgeted_available(torch.device("cpu"), 0.5) == 0  # already over it


def test_the_process_memory_in_use_is_its_resident_set():
    before = memory.in_use_bytes(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.in_use_bytes(torch.device("cpu")) - before >= 60 * 2**20
    del block


FREED_BLOCKS = """
import sys, torch
from spo_ray.memory import in_use_bytes, return_freed_blocks
if sys.argv[1] == "on":
    assert return_freed_blocks()
cpu = torch.device("cpu")
big = torch.ones(8 * 2**20 // 4); del big            # a large block freed: glibc raises its threshold to its size
base = in_use_bytes(cpu)
blocks = [torch.ones(2**20 // 4) for _ in range(200)]  # 200 MiB in 1 MiB blocks, touched
pin = torch.ones(2**20 // 4)                          # one more, kept: it sits above them in the heap
del blocks
print((in_use_bytes(cpu) - base) // 2**20)
"""


@pytest.mark.skipif(memory._libc_function("mallopt") is None, reason="no glibc mallopt here")
def test_returning_freed_blocks_makes_the_resident_memory_follow_what_is_held():
    """glibc keeps 200 freed 1 MiB blocks below a live one (its threshold raised by an earlier large free);
    with `return_freed_blocks` (what a memory budget turns on) each was its own mapping, returned when freed.
    In fresh processes: the setting is process-wide."""
    import subprocess
    import sys
    kept = {mode: int(subprocess.run([sys.executable, "-c", FREED_BLOCKS, mode], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ("off", "on")}
    assert kept["off"] >= 150 and kept["on"] <= 20, kept


def test_under_a_budget_the_levers_leave_room_for_the_steps_rise_over_its_floor():
    plain, in_bwd = lever_floor(), lever_floor(in_backward=True)
    room = int(in_bwd * memory.BUDGET_MARGIN) + 2  # (+2: the division back rounds down)
    assert plain < room and choose(room) == memory.Levers()  # no budget: the floor decides, and fits
    # the same room under a budget: the floor × 1.4 must fit, which takes the step in the backward
    assert choose(room, memory_budget=8.0) == memory.Levers(in_backward=True)
    assert choose(int(plain * memory.BUDGET_MARGIN) + 1, memory_budget=8.0) == memory.Levers()
