"""Arithmetic as chat, for instruct models (`data.source: chat_arithmetic`): questions in words as user turns,
answers judged by their final number, the operations and operand range chosen so that a real model's
accuracy can move both ways.

A pretrained 135M-parameter model solves 0 of GSM8K's problems, so no accuracy claim can be decided there;
asked "What is 12 + 7? Answer with just the number." it is right about 40% of the time (operands 0–20), and
its samples are right on some tries and wrong on others — the band where preference pairs from its own
samples (`data.sampled_pairs`) exist and accuracy is free to rise or fall. `data.chat_arithmetic` sets the
band: `operations` (+, -, *; "-" puts the larger operand first), `operands` ([low, high]) and the `question`
template.

- **Problems and split.** Every (a, b, op) with both operands in range is a problem. Problems are split
  into training and held-out sides by a seeded share (`data.eval_fraction`) of their *unordered* form for
  + and *, so "3 + 4" and "4 + 3" are on the same side: a held-out question was never asked in training in
  either order. The first `data.eval_questions` held-out questions (a fixed seeded order) are judged.
- **Answers** are read by `spo_ray.answers.final_number`: the last number of the reply that no "not" rules
  out ("7 + 5 = 12" answers 12, "12, not 13" answers 12). A reply counts as correct only if it ended (the
  end-of-turn or EOS token) within `data.max_new_tokens`.
- **Pairs.** Without `data.sampled_pairs`: chosen the gold reply "a op b = c", rejected the same with a
  plausible wrong result (a dropped carry, a digit off by one, a times-table slip) — fixed, off-policy
  text. With it: the model's own samples, verified by the rule above (`spo_ray.sampling`).
- **Evaluation.** Greedy accuracy on the judged questions (`eval/accuracy`), the share of replies that
  ended (`eval/ended_share`), each question's outcome in order (`eval/answers_correct`, for paired
  before/after intervals) and the retention log-prob of held-out reference answers: `data.retention_path`,
  else GSM8K's train.jsonl solutions where the GSM8K folder is present (another skill the model holds).

The chat template renders prompts and replies where the tokenizer has one (`data.chat_template`); without
one, a prompt is "Question: …\\nAnswer:" and a reply follows it after a space.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from spo_ray.answers import matches
from spo_ray.config import ChatArithmeticConfig, RunConfig
from spo_ray.engines import greedy_replies, resolve_engine
from spo_ray.sampling import SamplePrompt, SamplingSource
from spo_ray.tasks import arithmetic, gsm8k
from spo_ray.tasks.pairs import (SPLIT_SEED, PairReport, assistant_turn, chat_prompt, end_of_turn_id, eval_keys,
                                 finish_splits, pair_task, read_retention_examples, render_response,
                                 retention_evaluator, task_tokenizer, user_turn, uses_chat_template)
from spo_ray.tasks.task import Task

Problem = tuple[int, int, str]


def solve(a: int, b: int, op: str) -> int:
    return a * b if op == "*" else arithmetic.solve(a, b, op)


def all_problems(cfg: ChatArithmeticConfig) -> list[Problem]:
    low, high = cfg.operands
    return [(a, b, op) for op in cfg.operations for a in range(low, high + 1) for b in range(low, high + 1)
            if op != "-" or a >= b]


def problem_key(problem: Problem) -> str:
    """The side of the split a problem is on: commutative problems share a key with their mirror image."""
    a, b, op = problem
    if op in "+*":
        a, b = min(a, b), max(a, b)
    return f"{a}{op}{b}"


def question(cfg: ChatArithmeticConfig, problem: Problem) -> str:
    a, b, op = problem
    return cfg.question.format(a=a, op=op, b=b)


def gold_reply(problem: Problem) -> str:
    a, b, op = problem
    return f"{a} {op} {b} = {solve(a, b, op)}"


def wrong_results(problem: Problem) -> list[int]:
    """Plausible mistakes, distinct, never the answer, never negative: for + and - the built-in task's error
    model (dropped carry or borrow, a digit off by one, swapped digits); for * a times-table slip (a × (b ± 1),
    (a ± 1) × b) or a result off by one."""
    a, b, op = problem
    answer = solve(a, b, op)
    if op in "+-":
        candidates = arithmetic.mistakes(a, b, op) or [answer + 1]
    else:
        candidates = [answer - a, answer + a, answer - b, answer + b, answer - 1, answer + 1]
    return [v for v in dict.fromkeys(candidates) if v >= 0 and v != answer]


def split(cfg: ChatArithmeticConfig, eval_fraction: float) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems), each in a fixed seeded order (see the module docstring)."""
    problems = all_problems(cfg)
    held_out = eval_keys([problem_key(p) for p in problems], eval_fraction)
    rng = random.Random(SPLIT_SEED)
    train = [p for p in problems if problem_key(p) not in held_out]
    held = [p for p in problems if problem_key(p) in held_out]
    rng.shuffle(train)
    rng.shuffle(held)
    return train[:cfg.train_questions] if cfg.train_questions else train, held


class Renderer:
    """Questions and replies as the model sees them: through the chat template, or as plain text."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat

    def prompt(self, text: str) -> str:
        return chat_prompt(self.tokenizer, text) if self.chat else f"Question: {text}\nAnswer:"

    def response(self, text: str, reply: str) -> str:
        if self.chat:
            return render_response(self.tokenizer, user_turn(text), assistant_turn(reply), "chat_arithmetic")["response"]
        return " " + reply.strip()

    def stop_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} | ({end_of_turn_id(self.tokenizer)} - {None} if self.chat else set())


def fixed_pairs(cfg: ChatArithmeticConfig, problems: list[Problem], render: Renderer, seed: str) -> list[dict]:
    """Gold reply against one wrong result (seeded), per problem: the pairs without sampling."""
    rng = random.Random(f"{SPLIT_SEED}:{seed}")
    pairs = []
    for problem in problems:
        a, b, op = problem
        text = question(cfg, problem)
        wrong = rng.choice(wrong_results(problem))
        pairs.append({"prompt": render.prompt(text), "chosen": render.response(text, gold_reply(problem)),
                      "rejected": render.response(text, f"{a} {op} {b} = {wrong}")})
    return pairs


def sample_prompts(cfg: ChatArithmeticConfig, problems: list[Problem], render: Renderer) -> list[SamplePrompt]:
    return [SamplePrompt(text=render.prompt(question(cfg, p)), answer=solve(*p),
                         gold=render.response(question(cfg, p), gold_reply(p)), question=question(cfg, p))
            for p in problems]


def accuracy_evaluator(config: RunConfig, tokenizer, render: Renderer, problems: list[Problem]):
    """model → {accuracy, ended_share, answers_correct} on the judged held-out questions, greedy."""
    cfg = config.data.chat_arithmetic
    prompts = [render.prompt(question(cfg, p)) for p in problems]
    stop_ids = render.stop_ids()

    engine = resolve_engine(config.data.eval_engine, torch.cuda.is_available(), "data.eval_engine")

    def evaluate(model) -> dict:
        replies = greedy_replies(model, tokenizer, prompts, config.data.max_new_tokens, 64, stop_ids, engine,
                                 config.model.dtype)
        ended = [bool(ids) and ids[-1] in stop_ids for ids in replies]
        correct = [int(done and matches(tokenizer.decode(ids[:-1], skip_special_tokens=True), solve(*p)))
                   for ids, done, p in zip(replies, ended, problems)]
        return {"accuracy": sum(correct) / max(1, len(correct)), "ended_share": sum(ended) / max(1, len(ended)),
                "answers_correct": correct}
    return evaluate


def retention_answers(config: RunConfig, tokenizer, chat: bool) -> list[dict]:
    """`data.retention_path`'s prompt/response rows, else GSM8K's train.jsonl solutions where present."""
    data_cfg = config.data
    if not data_cfg.retention_answers:
        return []
    if data_cfg.retention_path:
        return read_retention_examples(data_cfg.retention_path, tokenizer, data_cfg.retention_answers)
    folder = Path(gsm8k.data_dir())
    if not (folder / "train.jsonl").is_file():  # an optional measure: said once, not an error
        print(f"data.retention_answers: no GSM8K train.jsonl in {folder} (set SPO_RAY_GSM8K_DIR or "
              f"data.retention_path); eval/retention_logp is not logged")
        return []
    return gsm8k.retention_examples(folder, tokenizer, chat, data_cfg.retention_answers)


def load_task(config: RunConfig, policy_path: str, reference_path: str) -> Task:
    """Chat arithmetic pairs (fixed, or sampled where data.sampled_pairs says so), greedy accuracy."""
    data_cfg, cfg = config.data, config.data.chat_arithmetic
    tokenizer = task_tokenizer(config, policy_path)
    render = Renderer(tokenizer, uses_chat_template(data_cfg, tokenizer))
    train, held_out = split(cfg, data_cfg.eval_fraction)
    where = f"data.chat_arithmetic (operations {''.join(cfg.operations)}, operands {list(cfg.operands)})"
    report = PairReport(sources=[where], rows=len(train) + len(held_out))
    train_pairs, eval_pairs, report = finish_splits(fixed_pairs(cfg, train, render, "train"),
                                                    fixed_pairs(cfg, held_out, render, "eval"), data_cfg,
                                                    tokenizer, report)
    accuracy = accuracy_evaluator(config, tokenizer, render, held_out[:data_cfg.eval_questions])
    kept = retention_answers(config, tokenizer, render.chat)
    retention = retention_evaluator(kept, tokenizer, config) if kept else None

    def evaluate(model) -> dict:
        metrics = accuracy(model) if data_cfg.eval_questions else {}
        return {**metrics, **(retention(model) if retention else {})}

    sampling = SamplingSource(train=sample_prompts(cfg, train, render), eval=sample_prompts(cfg, held_out, render),
                              check=matches, response_text=lambda prompt, reply: render.response(prompt.question, reply),
                              stop_ids=render.stop_ids())
    task = pair_task(config, policy_path, reference_path, tokenizer, train_pairs, eval_pairs, report, evaluate)
    task.sampling = sampling
    return task


__all__ = ["load_task", "all_problems", "split", "solve", "wrong_results", "question", "gold_reply"]
