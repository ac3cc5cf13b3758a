"""The arithmetic task's cached built-in initializations (tiny configs, a few training steps)."""

import os

import torch

import spo_ray.models as models
from spo_ray.models import load_init
from spo_ray.tasks.arithmetic import ArithmeticConfig, build_arithmetic_init, init_dir

TINY_TASK = ArithmeticConfig(min_digits=1, max_digits=1, pretrain_examples=200, sft_examples=100)
TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def test_second_build_reuses_the_cache_and_a_changed_config_gets_a_new_key(tmp_path):
    first = build_arithmetic_init("scratch", TINY_TASK, TINY_MODEL, tmp_path, progress=False)
    written = os.path.getmtime(first / "init.json")
    assert build_arithmetic_init("scratch", TINY_TASK, TINY_MODEL, tmp_path, progress=False) == first
    assert os.path.getmtime(first / "init.json") == written
    assert init_dir("scratch", TINY_TASK, {**TINY_MODEL, "hidden_size": 64}, tmp_path) != first
    assert init_dir("scratch", ArithmeticConfig(seed=1), TINY_MODEL, tmp_path) != init_dir(
        "scratch", ArithmeticConfig(seed=0), TINY_MODEL, tmp_path)
    # Spelling out a default does not change the key.
    assert init_dir("scratch", TINY_TASK, {**TINY_MODEL, "arch": "llama"}, tmp_path) == first


def test_tiny_base_and_sft_builds_are_loadable(tmp_path):
    sft = build_arithmetic_init("sft_short", TINY_TASK, TINY_MODEL, tmp_path, steps=3, base_steps=5, progress=False)
    base = init_dir("base", TINY_TASK, TINY_MODEL, tmp_path, steps=5)
    assert (base / "init.json").exists()
    model, tokenizer = load_init(sft)
    assert not model.training
    ids = tokenizer("Q: 1+2=?\nA:", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    base_model, _ = load_init(base)
    assert not torch.equal(model.lm_head.weight, base_model.lm_head.weight)  # SFT changed the base
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_builder_that_loses_the_race_uses_the_winners_init(tmp_path, monkeypatch):
    real_rename = os.rename

    def rename_after_a_rival(staging, target):
        real_rename(build_rival, target)  # the rival finishes first
        real_rename(staging, target)  # raises: the target exists and is not empty

    build_rival = tmp_path / "rival"
    build_arithmetic_init("scratch", TINY_TASK, TINY_MODEL, build_rival.parent / "elsewhere", progress=False)
    rival_built = next((tmp_path / "elsewhere").iterdir())
    real_rename(rival_built, build_rival)
    monkeypatch.setattr(models.os, "rename", rename_after_a_rival)
    path = build_arithmetic_init("scratch", TINY_TASK, TINY_MODEL, tmp_path, progress=False)
    assert (path / "init.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["elsewhere", path.name])


def test_pair_and_eval_counts_do_not_change_the_init_key_but_the_corpus_does(tmp_path):
    from dataclasses import replace
    key = init_dir("base", TINY_TASK, TINY_MODEL, tmp_path)
    for field, value in (("train_pairs", 7), ("eval_pairs", 9), ("eval_problems", 11)):
        assert init_dir("base", replace(TINY_TASK, **{field: value}), TINY_MODEL, tmp_path) == key
    for field, value in (("mistake_rate", 0.1), ("pretrain_examples", 123), ("reverse_answer", False)):
        assert init_dir("base", replace(TINY_TASK, **{field: value}), TINY_MODEL, tmp_path) != key
    assert init_dir("sft_short", replace(TINY_TASK, sft_examples=321), TINY_MODEL, tmp_path) != init_dir(
        "sft_short", TINY_TASK, TINY_MODEL, tmp_path)
