"""GSM8K: pair counts, the split by question, answer extraction, the local model and the pipeline end to end."""

import json

import pytest
import torch

from spo_ray.config import ConfigError, RunConfig, validate_run
from spo_ray.tasks import gsm8k
from spo_ray.tasks.gsm8k import extract_answer, format_solution, last_number, strip_annotations

GSM8K_DIR = gsm8k.data_dir()
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "example_model_solutions.jsonl").is_file(),
    reason=f"GSM8K folder not found at {GSM8K_DIR} (set SPO_RAY_GSM8K_DIR to the folder holding "
           f"example_model_solutions.jsonl and train.jsonl)")
TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


@pytest.mark.parametrize("text, answer", [
    ("so she has 9 eggs\n#### 1,234", 1234),
    ("#### 72", 72),
    ("He loses 5 dollars.\nA: -5", -5),
    ("Each costs 0.5 * 7 = 3.5\nA: 3.5", 3.5),
    ("A: $1,000.00", 1000),
    ("First, for Job A: 2000 hours * $15 = $30,000\nA: 8400", 8400),  # "A:" mid-line is not the answer
    ("A: 18\nQuestion: another one\nA: 7", 18),                         # the first marked answer counts
    ("The answer is 18.", None),
    ("", None),
])
def test_extract_answer_reads_the_marked_final_number(text, answer):
    assert extract_answer(text) == answer
    assert type(extract_answer(text)) is type(answer)


def test_last_number_is_the_flexible_fallback():
    assert last_number("so the total is 1,250 dollars.") == 1250
    assert last_number("no digits here") is None


def test_solutions_lose_calculator_annotations_and_use_the_A_marker():
    assert strip_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"
    assert strip_annotations("3/440 = <<3/440=0.00681818\nA: 0") == "3/440 = \nA: 0"  # cut off inside one
    assert format_solution("She sold 48/2 = <<48/2=24>>24.\n#### 24") == " She sold 48/2 = 24.\nA: 24"


def test_data_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_RAY_GSM8K_DIR", str(tmp_path))
    assert gsm8k.data_dir() == tmp_path
    with pytest.raises(ConfigError, match="example_model_solutions.jsonl: no such file"):
        gsm8k.gsm8k_questions()


@needs_gsm8k
def test_gsm8k_has_3275_pairs_over_1319_questions():
    questions = gsm8k.gsm8k_questions()
    pairs = gsm8k.gsm8k_pairs(questions)
    assert len(questions) == 1319
    assert len(pairs) == 3275
    assert len({p["prompt"] for p in pairs}) == 1163  # 156 questions have no incorrect model solution
    assert all(q["answer"] is not None for q in questions)
    first = pairs[0]
    assert first["prompt"].startswith("Question: Janet") and first["prompt"].endswith("\nAnswer:")
    assert first["chosen"].startswith(" ") and extract_answer(first["chosen"]) == 18
    assert extract_answer(first["rejected"]) != 18
    assert not any("<<" in p["chosen"] + p["rejected"] for p in pairs)


@needs_gsm8k
def test_sft_examples_come_from_train_jsonl_in_the_pair_format():
    examples = gsm8k.gsm8k_sft_examples()
    assert len(examples) == 7473
    assert examples[0]["response"].endswith("\nA: 72") and "<<" not in examples[0]["response"]


def gsm8k_config(**data) -> RunConfig:
    return validate_run({"model": {"init": "gsm8k-local-small", **TINY_MODEL},
                         "data": {"source": "gsm8k", "max_length": 256, **data}}, RunConfig)


@pytest.fixture(scope="module")
def gsm8k_cache(tmp_path_factory):
    """One cache for the module, so the local model (tokenizer training included) is built once."""
    return str(tmp_path_factory.mktemp("gsm8k_cache"))


@pytest.fixture(scope="module")
def gsm8k_task(gsm8k_cache):
    from spo_ray.tasks import load_task
    return load_task(gsm8k_config(eval_fraction=0.2), gsm8k_cache)


@needs_gsm8k
def test_no_question_is_on_both_sides_of_the_split(gsm8k_task):
    train_prompts = {p["prompt"] for p in gsm8k_task.train_pairs}
    eval_prompts = {p["prompt"] for p in gsm8k_task.eval_pairs}
    assert not train_prompts & eval_prompts
    assert len(gsm8k_task.train_pairs) + len(gsm8k_task.eval_pairs) == 3275
    # 20% of the 1319 questions are held out; the pairs follow their question.
    assert 0.15 < len(gsm8k_task.eval_pairs) / 3275 < 0.25


@needs_gsm8k
def test_gsm8k_task_uses_the_local_model_and_reports_truncation(gsm8k_task):
    assert "gsm8k-local-small-" in gsm8k_task.policy_path
    assert gsm8k_task.reference_path == gsm8k_task.policy_path
    info = json.loads((gsm8k.Path(gsm8k_task.policy_path) / "init.json").read_text())
    assert info["vocab_size"] == 3000 and info["model"]["hidden_size"] == 32
    assert "truncated to max_length" in gsm8k_task.notes[0] and "3275 rows" in gsm8k_task.notes[0]


@needs_gsm8k
def test_the_local_tokenizer_round_trips_gsm8k_text(gsm8k_task):
    tokenizer = gsm8k_task.tokenizer
    pair = gsm8k_task.train_pairs[0]
    text = pair["prompt"] + pair["chosen"]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # BPE merges: far fewer tokens than characters


@needs_gsm8k
def test_accuracy_evaluator_decodes_held_out_questions(gsm8k_task):
    from spo_ray.models import load_causal_lm

    model = load_causal_lm(gsm8k_task.policy_path, gsm8k_config().model)
    prompts = [p["prompt"] for p in gsm8k_task.eval_pairs[:4]]
    metrics = gsm8k.gsm8k_accuracy(model, gsm8k_task.tokenizer, prompts, [18] * 4, max_new_tokens=8)
    assert metrics == {"accuracy": 0.0, "accuracy_flexible": 0.0}  # an untrained model writes no answer


def test_accuracy_is_exact_match_of_the_extracted_answer(monkeypatch):
    import spo_ray.decoding as evaluation

    texts = {"q1": " so\nA: 18", "q2": " it is 7", "q3": " A: 1,000"}
    monkeypatch.setattr(evaluation, "greedy_decode", lambda model, tokenizer, prompts, *args, **kwargs: [texts[p] for p in prompts])
    tokenizer = type("Scripted", (), {"decode": staticmethod(lambda text, skip_special_tokens: text)})()
    metrics = gsm8k.gsm8k_accuracy(torch.nn.Linear(1, 1), tokenizer, ["q1", "q2", "q3"], [18, 7, 1000])
    assert metrics == {"accuracy": pytest.approx(2 / 3), "accuracy_flexible": 1.0}


@needs_gsm8k
def test_local_model_is_cached_by_its_settings(tmp_path):
    first = gsm8k.build_local_gsm8k_model(tmp_path, vocab_size=400, model_kwargs=TINY_MODEL)
    assert gsm8k.build_local_gsm8k_model(tmp_path, vocab_size=400, model_kwargs=TINY_MODEL) == first
    other = gsm8k.build_local_gsm8k_model(tmp_path, vocab_size=500, model_kwargs=TINY_MODEL)
    assert other != first and other.name.startswith("gsm8k-local-small-")


@needs_gsm8k
def test_train_runs_end_to_end_on_gsm8k_local_settings(gsm8k_cache, tmp_path):
    from spo_ray.trainer import train

    raw = {"loss": {"name": "spo", "beta": 0.1},
           "model": {"init": "gsm8k-local-small", **TINY_MODEL},
           "data": {"source": "gsm8k", "max_length": 128, "max_train_pairs": 32, "max_eval_pairs": 8,
                    "eval_questions": 4, "max_new_tokens": 8, "retention_answers": 4},
           "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "probe_every": 2, "log_every": 1,
                     "probe_pairs": 2, "num_threads": 1, "warmup_steps": 0}}
    metrics = train(validate_run(raw, RunConfig), cache_dir=gsm8k_cache, reference_dir=str(tmp_path))
    assert metrics["step"] == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "eval/accuracy" in metrics and "eval/accuracy_flexible" in metrics and "eval/loss" in metrics
    assert metrics["eval/retention_logp"] < 0
