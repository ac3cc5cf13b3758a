"""The shared reference log-prob cache (one computation per reference model × data × tokenization)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_as_accurate_as_float32, tiny_run
from spo_ray.config import validate_run
from spo_ray.data import PairDataset, TokenizedPair, collate_pairs
from spo_ray.logprobs import concatenated_forward
from spo_ray.reference import (ModelReference, cached_reference_logps, compute_reference_logps,
                               dataset_fingerprint, fingerprint, model_identity)
from spo_ray.trainer import train


def tiny_model(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32))


def dataset(shift=0):
    return PairDataset([TokenizedPair([1, 2 + shift, 3], [4, 5, 2], [6, 2]),
                        TokenizedPair([1, 7], [8, 9, 9, 2], [3, 2]),
                        TokenizedPair([5], [6, 2], [7, 7, 7, 2])])


class Counter:
    def __init__(self, model, data):
        self.model, self.data, self.calls = model, data, 0

    def __call__(self):
        self.calls += 1
        return compute_reference_logps(self.model, self.data, pad_token_id=0, batch_size=2)


def key_for(folder, data):
    return fingerprint(model_identity(str(folder)), dataset_fingerprint(data))


def test_cache_hits_on_second_use_and_misses_when_data_or_model_change(tmp_path):
    folder = tmp_path / "ref"
    tiny_model(0).save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    data = dataset()
    compute = Counter(model, data)
    first, hit = cached_reference_logps(tmp_path / "cache", key_for(folder, data), data, compute)
    second, hit_again = cached_reference_logps(tmp_path / "cache", key_for(folder, data), data, compute)
    assert (hit, hit_again, compute.calls) == (False, True, 1)
    assert all(torch.equal(first[k], second[k]) for k in first)

    changed = dataset(shift=1)
    assert key_for(folder, changed) != key_for(folder, data)
    _, hit = cached_reference_logps(tmp_path / "cache", key_for(folder, changed), changed, Counter(model, changed))
    assert not hit

    old_key = key_for(folder, data)
    tiny_model(1).save_pretrained(folder)  # new weights in the same folder
    assert key_for(folder, data) != old_key


def test_corrupt_or_partial_cache_file_is_rebuilt(tmp_path):
    model, data = tiny_model(0), dataset()
    compute = Counter(model, data)
    logps, _ = cached_reference_logps(tmp_path, "k", data, compute)
    path = tmp_path / "reflogps-k.parquet"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again, hit = cached_reference_logps(tmp_path, "k", data, compute)
    assert (hit, compute.calls) == (False, 2)
    assert all(torch.equal(logps[k], again[k]) for k in logps)
    # A table with the wrong number of rows (another dataset's) is not trusted either.
    _, hit = cached_reference_logps(tmp_path, "k", PairDataset(data.pairs[:2]), Counter(model, PairDataset(data.pairs[:2])))
    assert not hit


def test_cached_values_equal_the_model_run_on_each_batch():
    model, data = tiny_model(0), dataset()
    # Batches of 2 run shortest first ([2, 0], [1]): the table must still be in dataset order.
    table = compute_reference_logps(model, data, pad_token_id=0, batch_size=2)
    model64 = copy.deepcopy(model).double()
    for i in range(len(data)):  # one pair per batch: different padding than the cached batches
        batch = collate_pairs([data[i]], 0)
        on_the_fly = ModelReference(model)(batch)
        with torch.no_grad():
            exact = concatenated_forward(model64, batch)  # the float64 oracle
        for name, values in on_the_fly.items():
            assert_as_accurate_as_float32(table[name][i], values, exact[name], f"{name}[{i}]")


def test_training_with_and_without_the_cache_gives_the_same_metrics(init_cache, tmp_path):
    histories = []
    for cache in (True, False):
        rows = []
        train(validate_run(tiny_run(loss={"name": "spo"}, reference={"cache": cache})), cache_dir=init_cache,
              reference_dir=str(tmp_path), report=lambda row, ckpt: rows.append(row))
        histories.append(rows)
    for with_cache, without in zip(*histories):
        for key, value in with_cache.items():
            if key in ("train/tokens_per_s", "wall_time_s"):
                continue
            assert without[key] == pytest.approx(value, abs=1e-6), key
    assert list((tmp_path).glob("reflogps-*.parquet"))  # the cached run wrote its tables


# ---------------------------------------------------------------------------------------------------
# TR-DPO's synced reference (spo_ray.reference.SyncedReference)

def test_a_synced_reference_mixes_the_policy_in_every_sync_steps_and_keeps_the_initial_tables():
    from spo_ray.reference import SyncedReference

    reference, policy = tiny_model(0).double(), tiny_model(1).double()
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    state = copy.deepcopy(reference.state_dict())
    tables = compute_reference_logps(copy.deepcopy(reference), dataset(), pad_token_id=0, batch_size=2)
    synced = SyncedReference(reference, tables, sync_steps=3, mixup_alpha=0.25, policy=policy)
    for step in (1, 2):
        synced.step_done(policy, step)
    assert all(torch.equal(p, initial[name]) for name, p in reference.named_parameters())
    synced.step_done(policy, 3)
    theirs = dict(policy.named_parameters())
    for name, p in reference.named_parameters():  # 0.75·W_ref + 0.25·W_θ: two roundings of values ≤ the largest
        expected = 0.75 * initial[name] + 0.25 * theirs[name]
        assert (p - expected).abs().max() <= 4 * torch.finfo(torch.float64).eps * expected.abs().max(), name

    batch = collate_pairs(list(dataset()), pad_token_id=0)
    out = synced(batch)
    mixed = concatenated_forward(reference, batch)  # the model as it now is, for the loss …
    assert torch.equal(out["chosen_logps"], mixed["chosen_logps"].float())
    assert torch.equal(out["anchor_chosen_logps"], tables["chosen_logps"][batch["index"]])  # … the tables as it was
    assert not torch.allclose(out["chosen_logps"], out["anchor_chosen_logps"])
    synced.load_state_dict(state)  # a resumed run's reference (the checkpoint's "reference")
    assert all(torch.equal(p, initial[name]) for name, p in reference.named_parameters())


def test_a_lora_policy_is_mixed_in_with_its_adapters_merged():
    from peft import LoraConfig, get_peft_model
    from spo_ray.reference import SyncedReference

    reference = tiny_model(0).double()
    policy = get_peft_model(tiny_model(1).double(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapters change the weights
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    synced = SyncedReference(reference, {}, sync_steps=1, mixup_alpha=1.0, policy=policy)
    synced.step_done(policy, 1)  # α = 1: the reference becomes the merged policy
    for name, p in reference.named_parameters():
        assert (p - merged[name]).abs().max() <= 4 * torch.finfo(torch.float64).eps * merged[name].abs().max(), name
    assert not torch.equal(reference.model.layers[0].self_attn.q_proj.weight,
                           policy.get_base_model().model.layers[0].self_attn.q_proj.weight)  # not the bare base


def test_a_synced_reference_of_another_size_is_one_line_naming_the_key():
    from spo_ray.config import ConfigError
    from spo_ray.reference import SyncedReference

    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(ConfigError, match=r"^reference\.sync: the reference's weights are not the policy's"):
        SyncedReference(tiny_model(0), {}, sync_steps=1, mixup_alpha=0.5, policy=wider)
