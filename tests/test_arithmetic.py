"""The arithmetic task: tokenizer, formatting, the error model and the seeded, disjoint data sets."""

import random

import pytest

from spo_ray.tasks.arithmetic import (
    ArithmeticConfig,
    all_problems,
    classified_mistakes,
    eval_problems,
    format_answer,
    format_prompt,
    format_response,
    make_tokenizer,
    max_answer_digits,
    mistakes,
    parse_answer,
    preference_pairs,
    pretraining_texts,
    sample_mistake,
    sft_pairs,
    solve,
)

SMALL = ArithmeticConfig(pretrain_examples=2000, sft_examples=500, train_pairs=300, eval_pairs=50)


def test_tokenizer_gives_one_id_per_character_and_round_trips():
    tokenizer = make_tokenizer()
    text = "Q: 47+85=?\nA:231"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids  # nothing added around the text either
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_has_pad_bos_eos_and_pads_right():
    tokenizer = make_tokenizer()
    assert tokenizer.convert_ids_to_tokens([tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]) \
        == ["<pad>", "<bos>", "<eos>"]
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["Q:", "Q: 1"], padding=True)["input_ids"]
    assert batch[0][-1] == tokenizer.pad_token_id


def test_prompt_and_reversed_answer_format():
    cfg = ArithmeticConfig()
    assert format_prompt(47, 85, "+") == "Q: 47+85=?\nA:"
    assert format_answer(132, cfg) == "231"
    assert format_answer(100, cfg) == "001"
    assert parse_answer("231", cfg) == 132
    assert parse_answer("001", cfg) == 100
    natural = ArithmeticConfig(reverse_answer=False)
    assert format_answer(132, natural) == "132" and parse_answer("132", natural) == 132
    for bad in ("", "2a1", "-1", "23 1", "²"):
        assert parse_answer(bad, cfg) is None


def test_working_shows_each_column_with_its_carry():
    cfg = ArithmeticConfig(working=True)
    assert format_response(47, 85, "+", 132, cfg) == "7+5=12,4+8+1=13|231"
    assert format_response(52, 17, "-", 35, ArithmeticConfig(working=True, operations=("-",))) == "2-7=-5,5-1-1=3|53"
    assert parse_answer("7+5=12,4+8+1=13|231", cfg) == 132
    assert parse_answer("231", cfg) is None  # the working is part of the format


def test_dropped_carry_mistakes_by_hand():
    # 47+85=132: forgetting the units' carry gives 12 tens -> 122; forgetting the final carry gives 32;
    # forgetting both gives 22.
    by_kind = {}
    for kind, value in classified_mistakes(47, 85, "+"):
        by_kind.setdefault(kind, set()).add(value)
    assert by_kind["dropped_carry"] == {122, 32, 22}
    assert by_kind["off_by_one"] == {232, 142, 131, 133}  # not 32 as "032": the leading digit stays non-zero
    assert by_kind["swapped_digits"] == {312, 123}
    # 52-17=35: forgetting the borrow gives 5-1=4 tens -> 45.
    assert dict(classified_mistakes(52, 17, "-"))["dropped_carry"] == 45
    # No carry, no dropped-carry mistake.
    assert "dropped_carry" not in dict(classified_mistakes(12, 34, "+"))


@pytest.mark.parametrize("operation", ["+", "-"])
def test_mistakes_are_distinct_non_negative_and_never_the_answer(operation):
    cfg = ArithmeticConfig(min_digits=1, max_digits=2, operations=(operation,))
    for a, b, op in all_problems(cfg, "train") + all_problems(cfg, "eval"):
        values = mistakes(a, b, op)
        assert values, (a, b, op)
        assert len(set(values)) == len(values)
        assert solve(a, b, op) not in values
        assert min(values) >= 0


def test_sample_mistake_draws_from_the_error_model():
    rng = random.Random(0)
    draws = {sample_mistake(47, 85, "+", rng) for _ in range(300)}
    assert draws == set(mistakes(47, 85, "+"))


def test_data_sets_are_reproducible_per_seed():
    assert pretraining_texts(SMALL) == pretraining_texts(SMALL)
    assert preference_pairs(SMALL) == preference_pairs(SMALL)
    other_seed = ArithmeticConfig(**{**SMALL.__dict__, "seed": 1})
    assert pretraining_texts(other_seed) != pretraining_texts(SMALL)
    assert eval_problems(other_seed) != eval_problems(SMALL)


def test_train_and_eval_problems_are_disjoint_for_every_seed():
    cfg = ArithmeticConfig(operations=("+", "-"))
    train, held_out = set(all_problems(cfg, "train")), set(all_problems(cfg, "eval"))
    assert not train & held_out
    assert {(b, a, "+") for a, b, op in held_out if op == "+"} <= held_out  # 85+47 held out with 47+85
    eval_prompts = {format_prompt(*p) for p in held_out}
    for seed in (0, 1):
        seeded = ArithmeticConfig(**{**SMALL.__dict__, "seed": seed})
        train_prompts = {row["prompt"] for row in pretraining_texts(seeded) + sft_pairs(seeded)}
        train_prompts |= {row["prompt"] for row in preference_pairs(seeded, "train")}
        assert not train_prompts & eval_prompts
        assert {p["prompt"] for p in eval_problems(seeded)} <= eval_prompts
        assert {row["prompt"] for row in preference_pairs(seeded, "eval")} <= eval_prompts


def test_noisy_corpus_has_mistake_rate_share_of_mistakes():
    wrong = 0
    texts = pretraining_texts(SMALL)
    for row in texts:
        a, b = map(int, row["prompt"][3:].split("=")[0].split("+"))
        value = parse_answer(row["response"], SMALL)
        assert value == a + b or value in mistakes(a, b, "+")
        wrong += value != a + b
    assert wrong / len(texts) == pytest.approx(SMALL.mistake_rate, abs=0.03)


def test_preference_pairs_prefer_the_correct_answer_over_a_mistake():
    for row in preference_pairs(SMALL, "train") + preference_pairs(SMALL, "eval"):
        assert parse_answer(row["chosen"], SMALL) == row["answer"]
        assert parse_answer(row["rejected"], SMALL) in row["mistakes"]
    assert len(preference_pairs(SMALL, "train")) == SMALL.train_pairs
    assert len(preference_pairs(SMALL, "eval")) == SMALL.eval_pairs


def test_subtraction_keeps_results_non_negative_and_answers_fit_max_digits():
    cfg = ArithmeticConfig(min_digits=1, max_digits=2, operations=("+", "-"))
    results = [solve(*p) for p in all_problems(cfg, "train")]
    assert min(results) >= 0
    assert max(len(str(r)) for r in results) == max_answer_digits(cfg) == 3


def test_config_is_hashable_and_keyed():
    assert hash(ArithmeticConfig()) == hash(ArithmeticConfig(operations=["+"]))
    assert ArithmeticConfig().key() != ArithmeticConfig(seed=1).key()
    with pytest.raises(ValueError, match="operations"):
        ArithmeticConfig(operations=("*",))
