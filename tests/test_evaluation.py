"""The evaluators against slow, obviously-correct references on small random models."""

import copy
import itertools

import pytest
import torch

from conftest import assert_as_accurate_as_float32, naive_greedy, rounding_tolerance
from spo_ray.models import create_small_lm
from spo_ray.decoding import greedy_decode
from spo_ray.tasks.arithmetic import (MASS_KEYS, ArithmeticConfig, answer_mass_split, eval_problems, evaluate_task,
                                      greedy_accuracy, make_tokenizer, max_answer_digits, parse_answer)

TOKENIZER = make_tokenizer()


def random_model(arch="llama", seed=0, sharpness=8.0):
    """A tiny random model; a scaled-up output layer gives it peaked, varied next-token distributions."""
    model = create_small_lm(len(TOKENIZER), arch=arch, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    return model.eval()


def response_probabilities(model, prompt_ids, responses):
    """P(response | prompt) for equal-length responses, from full forwards of the unpadded sequences."""
    ids = torch.tensor([prompt_ids + response for response in responses])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.double(), dim=-1)
    start = len(prompt_ids) - 1
    targets = ids[:, start + 1 :]
    return logps[:, start:-1].gather(-1, targets[..., None]).squeeze(-1).sum(-1).exp().tolist()


def brute_force_masses(model, problem, cfg):
    """Enumerate every token string of length <= L over the whole vocabulary, ended by EOS, and sum."""
    prompt_ids = TOKENIZER(problem["prompt"], add_special_tokens=False)["input_ids"]
    masses = dict.fromkeys(("correct", "mistake", "other", "malformed_ended"), 0.0)
    for length in range(max_answer_digits(cfg) + 1):
        strings = [list(tokens) for tokens in itertools.product(range(len(TOKENIZER)), repeat=length)]
        probabilities = response_probabilities(model, prompt_ids, [s + [TOKENIZER.eos_token_id] for s in strings])
        for tokens, probability in zip(strings, probabilities):
            text = TOKENIZER.decode(tokens)
            natural = text[::-1] if cfg.reverse_answer else text
            well_formed = len(tokens) >= 1 and natural.isdigit() and str(int(natural)) == natural
            if not well_formed:
                masses["malformed_ended"] += probability
            elif int(natural) == problem["answer"]:
                masses["correct"] += probability
            elif int(natural) in problem["mistakes"]:
                masses["mistake"] += probability
            else:
                masses["other"] += probability
    return masses


@pytest.mark.parametrize("reverse_answer", [True, False])
def test_mass_split_equals_brute_force_enumeration(reverse_answer):
    cfg = ArithmeticConfig(min_digits=1, max_digits=1, operations=("+", "-"), reverse_answer=reverse_answer,
                           eval_problems=3)
    model = random_model()
    problems = eval_problems(cfg)
    split = answer_mass_split(model, TOKENIZER, problems, cfg, batch_size=200)  # 2 problems a batch
    model64 = copy.deepcopy(model).double()
    mean = lambda masses, key: sum(m[key] for m in masses) / len(problems)
    brute = [brute_force_masses(model, problem, cfg) for problem in problems]  # the model's float32 logits
    exact = [brute_force_masses(model64, problem, cfg) for problem in problems]  # the float64 oracle
    for key in ("correct", "mistake", "other"):
        assert_as_accurate_as_float32(split[f"mass_{key}"], mean(brute, key), mean(exact, key), key)
    # Ended malformed strings of length <= L are only part of the malformed mass, 1 − the other three: that
    # carries their float32 errors.
    carried = sum(abs(split[f"mass_{key}"] - mean(exact, key)) for key in ("correct", "mistake", "other"))
    assert split["mass_malformed"] >= mean(exact, "malformed_ended") - carried


def test_mass_split_sums_to_one_with_non_negative_parts():
    cfg = ArithmeticConfig(eval_problems=6)
    split = answer_mass_split(random_model(sharpness=1.0), TOKENIZER, eval_problems(cfg), cfg)
    assert set(split) == set(MASS_KEYS)
    # mass_malformed is 1 − the other three, in float64: 3 roundings there, 3 in this sum.
    assert sum(split.values()) == pytest.approx(1.0, abs=rounding_tolerance(1.0, 6, torch.float64))
    assert all(value >= 0.0 for value in split.values())  # sums of probabilities; malformed is ~0.97 here


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_equals_one_example_at_a_time(arch):
    # 1- and 2-digit operands: prompts of different lengths, so left padding is exercised.
    cfg = ArithmeticConfig(min_digits=1, max_digits=2, operations=("+", "-"), eval_problems=24)
    problems = eval_problems(cfg)
    model = random_model(arch, sharpness=3.0)
    prompts = [p["prompt"] for p in problems]
    assert len({len(p) for p in prompts}) > 1
    naive = [naive_greedy(model, TOKENIZER, prompt, 4, {TOKENIZER.eos_token_id}) for prompt in prompts]
    assert greedy_decode(model, TOKENIZER, prompts, 4, batch_size=10) == naive
    naive_correct = [
        ids[-1:] == [TOKENIZER.eos_token_id] and parse_answer(TOKENIZER.decode(ids[:-1]), cfg) == p["answer"]
        for ids, p in zip(naive, problems)
    ]
    assert greedy_accuracy(model, TOKENIZER, problems, cfg, batch_size=10, max_new_tokens=4) \
        == sum(naive_correct) / len(problems)


def test_evaluate_task_reports_accuracy_and_masses_and_restores_train_mode():
    cfg = ArithmeticConfig(eval_problems=4)
    model = random_model().train()
    metrics = evaluate_task(model, TOKENIZER, eval_problems(cfg), cfg)
    assert set(metrics) == {"accuracy", *MASS_KEYS}
    assert model.training
    with pytest.raises(ValueError, match="working"):
        answer_mass_split(model, TOKENIZER, [], ArithmeticConfig(working=True))
