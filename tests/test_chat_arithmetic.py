"""Arithmetic as chat (data.source chat_arithmetic): the problems and their split, the wrong results of the
fixed pairs, prompts and replies through a chat template, the greedy evaluator's judgement, and sampled
pairs from a files source with an answer column."""

import json

import pytest

from spo_ray import decoding
from spo_ray.config import ConfigError, validate_run
from spo_ray.tasks import chat_arithmetic as chat
from spo_ray.tasks import load_task
from spo_ray.tasks.gsm8k import train_bpe_tokenizer
from spo_ray.tasks.pairs import load_prompts

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with a BPE tokenizer that has a ChatML template (no model weights: the tasks only read it)."""
    texts = [f"What is {a} {op} {b}? Answer with just the number. {a} {op} {b} = {a + b} user assistant"
             for a in range(25) for b in range(25) for op in "+-*"]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    folder = tmp_path_factory.mktemp("chat_model")
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model_dir, **data):
    return validate_run({"model": {"init": str(model_dir)},
                         "data": {"source": "chat_arithmetic", "eval_fraction": 0.5, "eval_questions": 12,
                                  "retention_answers": 0, **data}})


def test_problems_cover_the_operand_range_and_mirror_images_share_a_side():
    cfg = validate_run({"data": {"chat_arithmetic": {"operations": ["+", "-", "*"], "operands": [2, 6]}}}).data.chat_arithmetic
    problems = chat.all_problems(cfg)
    assert len(problems) == 25 + 15 + 25  # a − b only where a ≥ b: 5·6/2 = 15
    assert all(a >= b for a, b, op in problems if op == "-")
    train, held = chat.split(cfg, eval_fraction=0.5)
    assert sorted(train + held) == sorted(problems)
    keys = lambda side: {chat.problem_key(p) for p in side}
    assert not keys(train) & keys(held)
    assert ((3, 5, "+") in train) == ((5, 3, "+") in train) and ((2, 6, "*") in held) == ((6, 2, "*") in held)
    assert chat.split(cfg, 0.5) == (train, held)  # fixed, whatever the run's seed


def test_wrong_results_are_plausible_and_never_the_answer():
    assert chat.wrong_results((7, 8, "*")) == [49, 63, 48, 64, 55, 57]  # 56 ∓ 7, 56 ∓ 8, 56 ∓ 1
    # 47 + 85 = 132: a carry dropped (122, 32, both: 22), a digit off by one (232, 142, 131, 133; 032 is not a
    # number and 122 is there already), two digits swapped (312, 123).
    assert chat.wrong_results((47, 85, "+")) == [122, 32, 22, 232, 142, 131, 133, 312, 123]
    for problem in [(0, 0, "+"), (0, 5, "*"), (9, 9, "-"), (1, 1, "*"), (20, 20, "+")]:
        wrong = chat.wrong_results(problem)
        assert wrong and chat.solve(*problem) not in wrong and min(wrong) >= 0


def test_prompts_and_replies_go_through_the_chat_template(model_dir):
    task = load_task(run_config(model_dir), cache_dir=str(model_dir.parent))
    pair = task.train_pairs[0]
    question = pair["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    a, op, b = question.removeprefix("What is ").split("?")[0].split()
    assert pair["prompt"] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert pair["chosen"] == f"{a} {op} {b} = {chat.solve(int(a), int(b), op)}<|im_end|>\n"
    wrong = int(pair["rejected"].split("= ")[1].split("<")[0])
    assert wrong in chat.wrong_results((int(a), int(b), op))
    source = task.sampling
    first = source.train[0]
    assert first.text == pair["prompt"] and first.answer == chat.solve(int(a), int(b), op)
    assert source.response_text(first, f" {a} {op} {b} = 3 ") == f"{a} {op} {b} = 3<|im_end|>\n"
    assert source.check("the answer is 7, not 8", 7) and not source.check("7 + 1 = 8", 7)
    assert len(source.eval) >= 12 and {p.text for p in source.eval}.isdisjoint(p.text for p in source.train)


def test_greedy_accuracy_counts_a_reply_only_if_it_ended_with_the_right_final_number(model_dir, monkeypatch):
    config = run_config(model_dir, eval_questions=4)
    task = load_task(config, cache_dir=str(model_dir.parent))
    tokenizer = task.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    held = chat.split(config.data.chat_arithmetic, 0.5)[1][:4]
    replies = [f"{chat.solve(*held[0])}", f"it is {chat.solve(*held[1]) + 1}",
               f"{chat.solve(*held[2])}", f"so {chat.solve(*held[3])}, not {chat.solve(*held[3]) + 1}"]
    ended = [True, True, False, True]
    scripted = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([end] if e else []) for r, e in zip(replies, ended)]
    monkeypatch.setattr(decoding, "greedy_decode", lambda *args, **kwargs: scripted)
    metrics = task.evaluate(object())
    assert metrics["answers_correct"] == [1, 0, 0, 1]
    assert (metrics["accuracy"], metrics["ended_share"]) == (0.5, 0.75)


def test_files_with_an_answer_column_give_prompts_and_without_one_are_refused(tmp_path, model_dir):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1,
             "chosen": [{"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]} for i in range(20)]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_run({"model": {"init": str(model_dir)},
                           "data": {"source": "files", "path": str(path), "sampled_pairs": {}, "eval_fraction": 0.25}})
    task = load_task(config, cache_dir=str(tmp_path))
    train, held = task.sampling.train, task.sampling.eval
    assert (len(train), len(held)) == (15, 5) and task.train_pairs == []
    first = train[0]
    assert first.text.startswith("<|im_start|>user\nWhat is ") and first.text.endswith("<|im_start|>assistant\n")
    number = int(first.text.split("What is ")[1].split(" ")[0])
    assert first.answer == number + 1 and first.gold == f"{number} + 1 = {number + 1}<|im_end|>\n"
    assert task.sampling.response_text(first, "it is 5") == "it is 5<|im_end|>\n"

    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"questions.jsonl line 1: missing column\(s\) 'answer'"):
        load_prompts(config.data, task.tokenizer)


def test_retention_without_the_gsm8k_folder_is_said_in_one_line_not_dropped_silently(tmp_path, monkeypatch, capsys):
    from spo_ray.tasks.chat_arithmetic import retention_answers
    monkeypatch.setenv("SPO_RAY_GSM8K_DIR", str(tmp_path))  # no train.jsonl there
    config = validate_run({"data": {"source": "chat_arithmetic", "retention_answers": 4}})
    assert retention_answers(config, tokenizer=None, chat=True) == []
    assert capsys.readouterr().out == (f"data.retention_answers: no GSM8K train.jsonl in {tmp_path} (set "
                                       f"SPO_RAY_GSM8K_DIR or data.retention_path); eval/retention_logp is not logged\n")
