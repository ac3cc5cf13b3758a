"""Pairs sampled from the model itself (spo_ray.sampling, spo_ray.tasks.sampled, spo_ray.answers): the answer
rule on tricky replies, pair building on a hand-made sample table, top-p against transformers' own warper,
the same seed giving the same samples however the batches are shared out, the table built once and read by
later runs, and the sweep's bad input (a sampler that gives no pairs) as one line and exit 2."""

import copy

import pandas as pd
import pytest
import torch

from conftest import tiny_run
from spo_ray.answers import final_number, matches
from spo_ray.config import ConfigError, validate_run
from spo_ray.decoding import encode_prompts
from spo_ray.models import create_small_lm
from spo_ray.sampling import (SamplePrompt, Sampling, batch_generator, build_pairs, cached_samples, next_tokens,
                              pair_order, plan_batches, pool_rows, sample_batch, sample_rows, sampler_figures,
                              table_path)
from spo_ray.tasks.arithmetic import make_tokenizer

TOKENIZER = make_tokenizer()


# ---------------------------------------------------------------------------------------------------
# The answer rule

@pytest.mark.parametrize("reply, answer", [
    ("5.", 5),                          # a full stop, not a decimal point
    ("1,234", 1234),                    # thousands separator
    ("-3", -3),                         # a sign
    ("12, not 13", 12),                 # a negated number is ruled out
    ("The answer is 12, not 13.", 12),
    ("No, it isn't 7; it is 8.", 8),
    ("7 + 5 = 12", 12),                 # working towards the answer ends on it
    ("16 - 5 = 11", 11),                # a subtraction's minus is not a sign
    ("x = -3", -3),
    ("$1,234.50", 1234.5),
    ("12, 13", 13),                     # two numbers, not 12,13 as one
    ("Answer: 18.0", 18),               # integral values compare as int
    ("it is .5", 0.5),
])
def test_the_final_number_is_the_last_one_no_negation_rules_out(reply, answer):
    assert final_number(reply) == answer
    assert type(final_number(reply)) is type(answer)


def test_replies_without_an_answer_and_text_answers():
    assert final_number("no digits here") is None
    assert final_number("it is not 3") is None
    assert matches("The capital is Paris.", "paris") and not matches("Lyon", "Paris")
    assert matches("The total is 1,234.", "1234") and matches("12", 12.0) and not matches("13", 12)


# ---------------------------------------------------------------------------------------------------
# Pairs from a sample table

def sample(prompt: int, index: int, completion: str, ended: bool = True) -> dict:
    return {"prompt": prompt, "sample": index, "completion": completion, "ended": ended, "tokens": len(completion)}


def test_pair_order_cycles_through_both_sets_and_never_repeats_a_combination():
    # Round 0 pairs winner w with loser w, round 1 with loser w + 1, ...: both sets cycle from the start.
    assert pair_order(2, 3, 4) == [(0, 0), (1, 1), (0, 1), (1, 2)]
    assert pair_order(3, 1, 10) == [(0, 0), (1, 0), (2, 0)]
    every = pair_order(4, 5, 100)
    assert len(every) == 20 and set(every) == {(w, l) for w in range(4) for l in range(5)}


def test_pairs_cycle_drop_prompts_without_a_loser_and_fall_back_to_the_gold_answer():
    prompts = [SamplePrompt("p0", 7, gold="G0"), SamplePrompt("p1", 3, gold="G1"), SamplePrompt("p2", 5, gold="G2"),
               SamplePrompt("p3", 9, gold=None)]
    rows = [
        # p0: winners "7" and "it is 7" ("7" twice: one winner), losers "6", "8" and a cut-off "7"
        sample(0, 0, "7"), sample(0, 1, "6"), sample(0, 2, "it is 7"), sample(0, 3, "8"), sample(0, 4, "7"),
        sample(0, 5, "7", ended=False),
        # p1: always right -> no loser, no pair
        sample(1, 0, "3"), sample(1, 1, "3."),
        # p2: never right -> the gold answer wins
        sample(2, 0, "4"), sample(2, 1, "6"), sample(2, 2, "4"),
        # p3: never right, no gold -> nothing
        sample(3, 0, "1"),
    ]
    check = lambda reply, answer: final_number(reply) == answer
    pairs, counts = build_pairs(prompts, rows, check, lambda prompt, reply: f"<{reply}>", 4, gold_fallback=True)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p0", "<7>", "<6>"), ("p0", "<it is 7>", "<8>"),   # round 0
        ("p0", "<7>", "<8>"), ("p0", "<it is 7>", "<7>"),   # round 1 (the cut-off "7" is a loser)
        ("p2", "G2", "<4>"), ("p2", "G2", "<6>"),
    ]
    assert [(c["samples"], c["correct"], c["ended"], c["pairs"], c["gold"]) for c in counts] == [
        (6, 3, 5, 4, False), (2, 2, 2, 0, False), (3, 0, 3, 2, True), (1, 0, 1, 0, False)]
    figures = sampler_figures(counts, {"tokens_per_s": 10.0, "seconds": 2.0})
    assert figures["sampler/sample_accuracy"] == 5 / 12
    assert figures["sampler/prompts_with_pair"] == 2 / 4
    assert figures["sampler/prompts_right_and_wrong"] == 1 / 4  # p0 only: p2's pairs are the gold answer's
    assert (figures["sampler/prompts_all_correct"], figures["sampler/prompts_none_correct"]) == (1 / 4, 2 / 4)
    assert (figures["sampler/pairs"], figures["sampler/gold_used"]) == (6.0, 1.0)

    without_gold, _ = build_pairs(prompts, rows, check, lambda prompt, reply: reply, 1, gold_fallback=False)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in without_gold] == [("p0", "7", "6")]


# ---------------------------------------------------------------------------------------------------
# Generation

def test_top_p_keeps_the_tokens_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=generator) * 3
    for top_p in (0.3, 0.7, 0.95):
        kept_by_transformers = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        draws = torch.stack([next_tokens(torch.log_softmax(logits, -1), 1.0, top_p, torch.rand(64, generator=generator))
                             for _ in range(200)])
        drawn = torch.zeros_like(kept_by_transformers)
        drawn[torch.arange(64).repeat(200), draws.flatten()] = True
        assert not (drawn & ~kept_by_transformers).any()  # never a token transformers would have cut
    assert torch.equal(next_tokens(logits, 0.0, 1.0, None), logits.argmax(-1))  # temperature 0: greedy


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 1.0), (0.5, 0.9), (2.0, 0.6)])
def test_a_token_is_drawn_with_its_tempered_top_p_probability(temperature, top_p):
    """The share of the uniform numbers in [0, 1) that give each token is its probability under
    softmax(logits / T), cut to the top-p set and renormalized, computed here in float64 from the definition."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -4.0, 1.5, 2.5]])
    probs = torch.softmax(logits.double()[0] / temperature, -1)
    ranked = probs.argsort(descending=True).tolist()
    mass, kept = 0.0, []
    for token in ranked:  # the smallest set of top tokens whose mass reaches top_p
        kept.append(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    # N evenly spaced numbers: token i is drawn for the ones in an interval of length p_i, so for between
    # N p_i - 1 and N p_i + 1 of them; p_i is a float32 softmax there (a few 2^-24 relative: 1e-6 is ample).
    n = 100_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = next_tokens(logits.expand(n, -1), temperature, top_p, uniforms)
    counts = torch.bincount(drawn, minlength=logits.size(-1)).double()
    assert torch.all((counts - n * expected).abs() <= 1.0 + n * expected * 1e-6)
    assert set(drawn.unique().tolist()) == set(kept)


def test_batches_fit_the_token_budget_in_prompt_order():
    # A batch holds POOLS_PER_BATCH (4) pools of 50 tokens: 200.
    sampling = Sampling(samples_per_prompt=4, max_new_tokens=6, batch_tokens=50)
    # Each prompt's 4 rows count at prompt + 6 tokens, the batch at its widest prompt: [0, 1] is 2 × 4 × 18 =
    # 144 tokens, adding 2 would make it 216 > 200; [2, 3] would be 2 × 4 × 36 = 288, [3, 4] too.
    assert plan_batches([10, 12, 8, 30, 5], sampling) == [[0, 1], [2], [3], [4]]
    assert plan_batches([50], sampling) == [[0]]  # a prompt over the budget still gets a batch of its own


def test_a_pool_holds_the_whole_prompts_that_fit_the_token_budget():
    sampling = Sampling(samples_per_prompt=4, max_new_tokens=6, batch_tokens=200)
    assert pool_rows([10, 12], sampling) == 8  # rows of 18 tokens: 200 // (18 × 4) = 2 prompts
    assert pool_rows([10, 30], sampling) == 4  # rows of 36: 200 // 144 = 1 prompt
    assert pool_rows([60], sampling) == 4  # one prompt's samples even where they exceed the budget


@pytest.fixture(scope="module")
def random_model():
    ids = {key: getattr(TOKENIZER, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return create_small_lm(len(TOKENIZER), hidden_size=32, num_layers=2, num_heads=2, seed=1, **ids).eval()


PROMPTS = [f"Q: {a}+{b}=?\nA:" for a, b in [(12, 34), (5, 67), (80, 9), (41, 41), (3, 3), (99, 1)]]


def test_the_same_seed_gives_the_same_samples_however_the_batches_are_shared(random_model):
    # pools of one prompt's 3 samples, batches of 2 prompts (the second joins as the first one's samples end)
    sampling = Sampling(samples_per_prompt=3, temperature=1.0, max_new_tokens=5, seed=3, batch_tokens=25)
    stop = {TOKENIZER.eos_token_id}
    lengths = [len(TOKENIZER(p)["input_ids"]) for p in PROMPTS]
    batches = plan_batches(lengths, sampling)
    assert len(batches) >= 3 and pool_rows(lengths, sampling) == 3
    whole = sample_rows(random_model, TOKENIZER, PROMPTS, sampling, stop)
    assert whole == sample_rows(random_model, TOKENIZER, PROMPTS, sampling, stop)
    # Two "workers", the batches handed out in another order: the same rows.
    shared = (sample_rows(random_model, TOKENIZER, PROMPTS, sampling, stop, list(range(1, len(batches), 2)))
              + sample_rows(random_model, TOKENIZER, PROMPTS, sampling, stop, list(range(0, len(batches), 2))))
    key = lambda row: (row["prompt"], row["sample"])
    assert sorted(shared, key=key) == sorted(whole, key=key)
    assert [key(r) for r in whole] == [(p, s) for p in range(len(PROMPTS)) for s in range(3)]
    other = sample_rows(random_model, TOKENIZER, PROMPTS, Sampling(**{**sampling.key_fields(), "seed": 4}), stop)
    assert [r["completion"] for r in other] != [r["completion"] for r in whole]
    # A row that did not end ran to max_new_tokens; one that ended spent a token on its stop token.
    assert all(r["tokens"] == 5 if not r["ended"] else r["tokens"] <= 4 for r in whole)
    assert {r["ended"] for r in whole} == {True, False}


def test_a_sample_is_the_same_whether_its_prompt_waited_for_the_pool_or_not(random_model):
    """In float64 (no rounding differences between batch shapes), a batch sampled by a pool of one prompt at
    a time (the others join as samples end) gives the rows a pool of all its prompts gives: a sample's
    uniform numbers are its row's, whatever shares its step."""
    model = copy.deepcopy(random_model).double()
    prompt_ids = encode_prompts(TOKENIZER, PROMPTS)
    stop, pad = {TOKENIZER.eos_token_id}, TOKENIZER.pad_token_id
    whole = Sampling(samples_per_prompt=3, temperature=1.0, max_new_tokens=6, seed=5, batch_tokens=10**6)
    narrow = Sampling(**{**whole.key_fields(), "batch_tokens": 30})
    assert pool_rows([len(ids) for ids in prompt_ids], narrow) == 3
    with torch.no_grad():
        expected = sample_batch(model, prompt_ids, whole, stop, pad, batch_generator(5, 0))
        assert sample_batch(model, prompt_ids, narrow, stop, pad, batch_generator(5, 0)) == expected
    assert len({len(ids) for ids, _ in expected}) > 2  # samples end at different steps


def test_a_sample_continues_its_prompt_as_one_prompt_alone_would(random_model):
    """Rows leave the batch as they finish: what remains must still sample from its own prompt. At
    temperature 0 every copy of a prompt is its greedy continuation, batched or alone."""
    from spo_ray.decoding import greedy_decode

    greedy = Sampling(samples_per_prompt=2, temperature=0.0, max_new_tokens=6, batch_tokens=10_000)
    rows = sample_rows(random_model, TOKENIZER, PROMPTS, greedy, {TOKENIZER.eos_token_id})
    for prompt in range(len(PROMPTS)):
        [alone] = greedy_decode(random_model, TOKENIZER, [PROMPTS[prompt]], 6)
        alone = alone[:-1] if alone and alone[-1] == TOKENIZER.eos_token_id else alone
        for row in (r for r in rows if r["prompt"] == prompt):
            assert row["completion"] == TOKENIZER.decode(alone, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------
# The table, once

def test_a_sample_table_is_generated_once_and_read_back_by_later_callers(tmp_path):
    calls = []
    rows = [sample(0, 0, "12"), sample(0, 1, "it is 13", ended=False)]

    def generate():
        calls.append(1)
        return rows, {"seconds": 1.5, "tokens": 9, "tokens_per_s": 6.0, "workers": 1}

    first = cached_samples(str(tmp_path), "k1", generate)
    second = cached_samples(str(tmp_path), "k1", generate)
    assert (first[2], second[2], len(calls)) == (False, True, 1)
    assert second[0] == rows and second[1]["tokens_per_s"] == 6.0
    stored = pd.read_parquet(table_path(str(tmp_path), "k1"))
    assert stored["completion"].tolist() == ["12", "it is 13"] and stored["ended"].tolist() == [True, False]


def sampled_run(tmp_path, **sampled):
    return validate_run(tiny_run(data={"sampled_pairs": {"samples_per_prompt": 4, "prompts": 24, "eval_prompts": 8,
                                                         "temperature": 1.0, "max_new_tokens": 4, **sampled}}))


def test_trials_share_one_table_and_its_pairs(tmp_path, init_cache, monkeypatch):
    from spo_ray.tasks import load_task
    from spo_ray.tasks import sampled as sampled_module

    config = sampled_run(tmp_path)
    samples_dir = str(tmp_path / "shared")
    first = load_task(config, init_cache, samples_dir=samples_dir)
    monkeypatch.setattr(sampled_module.SamplingJob, "generate", lambda self, *a, **k: pytest.fail("sampled twice"))
    second = load_task(config.model_copy(update={"train": config.train.model_copy(update={"seed": 7})}), init_cache,
                       samples_dir=samples_dir)
    assert second.train_pairs == first.train_pairs and second.eval_pairs == first.eval_pairs
    # The scratch model is never right, so every winner is the gold answer (the correct digits).
    assert all(p["chosen"] == str(eval(p["prompt"][3:-5]))[::-1] for p in first.train_pairs)
    assert first.metrics["sampler/gold_used"] == first.metrics["sampler/prompts"] == 24
    assert first.metrics["sampler/pairs"] == len(first.train_pairs) <= 24 * 4
    counts = pd.read_csv(next((tmp_path / "shared").glob("samples-*-k4-gold.csv")))
    assert (counts["split"] == "train").sum() == 24 and (counts["split"] == "eval").sum() == 8


def test_a_sampler_that_gives_no_pairs_is_one_line_with_its_counts(tmp_path, init_cache):
    from spo_ray.tasks import load_task
    with pytest.raises(ConfigError, match=r"data.sampled_pairs: the sampler gave no pairs: 0 of 96 samples correct "
                                          r"over 24 prompts \(0 prompts always right, 24 never right\)"):
        load_task(sampled_run(tmp_path, gold_fallback=False), init_cache, samples_dir=str(tmp_path / "shared"))
