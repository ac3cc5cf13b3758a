"""GSM8K (Cobbe et al. 2021, arXiv:2110.14168) as a real reasoning preference task (`data.source: gsm8k`):
its pairs and split, the accuracy evaluator, the small local model and the `Task` they make.

`example_model_solutions.jsonl` holds the 1319 test questions with a ground-truth solution and four model
solutions each (GPT-3 6B/175B, fine-tuned or verifier-ranked). A pair is (ground truth, one *incorrect*
model solution): 3275 pairs over the 1163 questions that have at least one incorrect solution. Chosen and
rejected are both fluent step-by-step solutions of the same question that differ in a reasoning step, which
is exactly the "similar responses" regime where DPO's likelihood displacement shows.

Text formatting, shared by pairs, SFT data and the evaluator:

- prompt ``"Question: <question>\\nAnswer:"``, response ``" <solution>"``: the leading space makes the
  response tokenize as it would inside the joined text (word-initial tokens of BPE tokenizers carry it);
- the ``<<48/2=24>>`` calculator annotations are stripped: they are an artefact of the calculator tool the
  GSM8K authors ran their models with, repeat the result written right after them, and would make a model
  without that tool spend tokens (and preference signal) on a markup it cannot use;
- answers end in ``"A: <number>"`` (train.jsonl's ``"#### <number>"`` is rewritten to that), so a model
  trained on the SFT data answers in the format of the preference pairs and `extract_answer` reads both.

Instruct models see GSM8K as a chat (`data.chat_template`; by default whenever the tokenizer has a chat
template): the question is the user message and a solution the assistant's reply, rendered with the
template like any conversational pair (`spo_ray.tasks.pairs.render_conversation`: the prompt is the
rendered user turn with the generation prompt, a response what the template adds after it). The accuracy
evaluator renders its questions the same way and stops decoding at the template's end-of-turn token.

Beside accuracy, the evaluator logs `retention_logp` (`spo_ray.tasks.pairs.retention_evaluator`): the
per-token log-prob of held-out reference answers that are in no pair, here train.jsonl's solutions to
questions the pairs do not ask.

The data folder is `$SPO_RAY_GSM8K_DIR`, by default `../shared/data/gsm8k` next to the repository; the
files are read in place, never copied. `build_local_gsm8k_model` makes the small local model that the
reserved `model.init: gsm8k-local-small` names (see its docstring); pairs are validated and split by
`spo_ray.tasks.pairs`, like any pair file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import torch

from spo_ray.answers import final_number
from spo_ray.config import ConfigError, DataConfig, RunConfig
from spo_ray.engines import greedy_replies, resolve_engine
from spo_ray.models import cached_init, create_small_lm, save_to_cache, small_lm_kwargs, train_on_responses
from spo_ray.tasks.pairs import (PAIR_COLUMNS, PairReport, assistant_turn, cap, chat_prompt, end_of_turn_id,
                                 eval_keys, finish_splits, pair_task, render_response, retention_evaluator,
                                 rows_to_pairs, task_tokenizer, user_turn, uses_chat_template)
from spo_ray.sampling import SamplePrompt, SamplingSource
from spo_ray.tasks.task import Task

MODEL_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
LOCAL_MODEL_NAME = "gsm8k-local-small"  # reserved `model.init`: built by `build_local_gsm8k_model`
# Accuracy is judged on `data.eval_questions` held-out questions, decoding at most `data.max_new_tokens`
# each: GSM8K solutions are ~100 tokens for GPT-style tokenizers, and greedy decoding is the slow part of
# an evaluation.
MAX_NEW_TOKENS = 256
SFT_MAX_TOKENS = 256  # local model's SFT examples: ~95% of train.jsonl with its own 3k-token BPE
# Bump when a change here changes what `build_local_gsm8k_model` writes.
LOCAL_MODEL_VERSION = 1

# An annotation is `<<expr=result>>`; some model solutions were cut off inside one, which then runs to the
# end of its line.
_ANNOTATION = re.compile(r"<<[^<>\n]*(?:>>|$)", re.MULTILINE)
_NUMBER = r"(?P<sign>-)?\s*\$?\s*(?P<digits>\d[\d,]*(?:\.\d+)?|\.\d+)"
# `####` anywhere; `A:` only at a line start, because solutions say things like "Job A: 2000 hours".
_ANSWER = re.compile(r"(?:####|^[ \t]*A:)[ \t]*" + _NUMBER, re.MULTILINE)


def data_dir() -> Path:
    """`$SPO_RAY_GSM8K_DIR`, else `<repo>/../shared/data/gsm8k` (resolved from this file, not the cwd)."""
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
    return Path(os.environ.get("SPO_RAY_GSM8K_DIR", default))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (set SPO_RAY_GSM8K_DIR or data.path to the GSM8K folder)")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------------------------- text

def strip_annotations(text: str) -> str:
    """Drop `<<48/2=24>>` calculator annotations (see the module docstring for why)."""
    return _ANNOTATION.sub("", text)


def format_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def format_solution(solution: str) -> str:
    """A solution as a response: annotations stripped, `#### n` written `A: n`, one leading space."""
    text = strip_annotations(solution).strip()
    text = re.sub(r"^[ \t]*####[ \t]*", "A: ", text, flags=re.MULTILINE)
    return " " + text


def _number(match: re.Match) -> int | float:
    value = float(match["digits"].replace(",", "")) * (-1 if match["sign"] else 1)
    return int(value) if value.is_integer() else value


def extract_answer(text: str) -> int | float | None:
    """The final answer of a solution: the number after `####` or after a line-initial `A:`.

    Commas are dropped ("1,234" → 1234), a sign and decimals are kept, and integral values come back as
    int so 18 == 18.0 compares equal either way. The first marked answer counts (a model that goes on
    after answering is judged on its answer); None when there is none.
    """
    match = _ANSWER.search(text)
    return _number(match) if match else None


def last_number(text: str) -> int | float | None:
    """The final number of the text (`spo_ray.answers.final_number`: the last one no "not" rules out):
    lm-eval's "flexible extract", for models that skip the `A:` marker."""
    return final_number(text)


def stated_answer(text: str) -> int | float | None:
    """What a sampled solution answers: its marked answer (`extract_answer`), else its final number."""
    marked = extract_answer(text)
    return final_number(text) if marked is None else marked


# ----------------------------------------------------------------------------------------------- data

def gsm8k_questions(folder: str | Path | None = None) -> list[dict]:
    """Every question of example_model_solutions.jsonl: {"prompt", "answer", "chosen", "rejected": [...]}."""
    rows = _read_jsonl(Path(folder or data_dir()) / "example_model_solutions.jsonl")
    questions = []
    for row in rows:
        rejected = [format_solution(row[key]["solution"]) for key in MODEL_KEYS if not row[key]["is_correct"]]
        questions.append({"question": row["question"].strip(), "prompt": format_prompt(row["question"]),
                          "answer": extract_answer(row["ground_truth"]),
                          "chosen": format_solution(row["ground_truth"]), "rejected": rejected})
    return questions


def gsm8k_pairs(questions: list[dict] | None = None, chat: bool = False) -> list[dict]:
    """(ground truth, incorrect model solution) pairs, in file order: 3275 over the 1319 questions.
    `chat`: as messages (the question a user turn, the solutions assistant turns) for a chat template."""
    questions = gsm8k_questions() if questions is None else questions
    if chat:
        return [{"prompt": user_turn(q["question"]), "chosen": assistant_turn(q["chosen"]),
                 "rejected": assistant_turn(rejected)} for q in questions for rejected in q["rejected"]]
    return [{"prompt": q["prompt"], "chosen": q["chosen"], "rejected": rejected}
            for q in questions for rejected in q["rejected"]]


def gsm8k_sft_examples(folder: str | Path | None = None) -> list[dict]:
    """train.jsonl (7473 questions, disjoint from the pairs' test questions) as {"prompt", "response"}
    (and the raw "question")."""
    rows = _read_jsonl(Path(folder or data_dir()) / "train.jsonl")
    return [{"question": r["question"].strip(), "prompt": format_prompt(r["question"]),
             "response": format_solution(r["answer"])} for r in rows]


# ------------------------------------------------------------------------------------------ accuracy

def gsm8k_accuracy(model, tokenizer, questions: list[str], answers: list, *, max_new_tokens: int | None = None,
                   batch_size: int = 32, stop_ids: set[int] | None = None, engine: str = "spo_ray",
                   dtype: str = "float32") -> dict[str, float]:
    """Greedy-decoding accuracy on GSM8K prompts: exact match of the extracted final answer.

    `accuracy` reads the marked answer (`extract_answer`), `accuracy_flexible` the last number of the
    response (what a model that never learnt the `A:` format still gets right). Decoding stops at a token
    of `stop_ids` (default: EOS) or after `max_new_tokens` (default `MAX_NEW_TOKENS`); `engine` decodes
    (`spo_ray.engines.greedy_replies`: spo_ray, or vllm on a copy of the weights in `dtype`).
    """
    if not questions:
        return {"accuracy": float("nan"), "accuracy_flexible": float("nan")}
    responses = greedy_replies(model, tokenizer, questions, max_new_tokens or MAX_NEW_TOKENS, batch_size,
                               stop_ids, engine, dtype)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
    strict = sum(extract_answer(t) == a for t, a in zip(texts, answers))
    flexible = sum(last_number(t) == a for t, a in zip(texts, answers))
    return {"accuracy": strict / len(questions), "accuracy_flexible": flexible / len(questions)}


# -------------------------------------------------------------------------------- the local small model

def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (no download), with <pad>/<bos>/<eos>/<unk>.

    Byte-level: every string encodes (no unknown characters) and `decode(encode(s)) == s`. Nothing is
    added around a text, like the arithmetic task's tokenizer, so prompts score the same in training and
    in generation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="right")


def local_model_dir(cache_dir: str | Path, vocab_size: int, model_kwargs: dict, sft_steps: int,
                    folder: Path) -> Path:
    """`cache_dir/gsm8k-local-small-<key>`, the key hashing every setting that changes the weights."""
    train_file = folder / "train.jsonl"
    description = {"vocab_size": vocab_size, "model": model_kwargs, "sft_steps": sft_steps,
                   "train_bytes": train_file.stat().st_size if train_file.is_file() else None,
                   "version": LOCAL_MODEL_VERSION}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{LOCAL_MODEL_NAME}-{key}"


def build_local_gsm8k_model(cache_dir: str | Path, *, vocab_size: int = 3000, model_kwargs: dict | None = None,
                            sft_steps: int = 0, folder: str | Path | None = None, seed: int = 0,
                            progress: bool = False) -> Path:
    """The GSM8K pipeline's CPU stand-in for a hub model: a folder `from_pretrained` loads. Cached.

    A byte-level BPE tokenizer trained on train.jsonl's questions and solutions, and a small Llama from
    `create_small_lm` (`model_kwargs`: arch, hidden_size, num_layers, num_heads), optionally fine-tuned for
    `sft_steps` on train.jsonl's solutions. Accuracy stays near zero at these sizes; the point is to run
    the real-data pipeline (files → pairs → tokenizer → model folder → trainer → evaluator) end to end.
    Written with `save_to_cache`, so concurrent trials never see half a model.
    """
    folder = Path(folder or data_dir())
    model_kwargs = {"max_position_embeddings": 1024, **(model_kwargs or {})}
    target = local_model_dir(cache_dir, vocab_size, model_kwargs, sft_steps, folder)
    with cached_init(target) as found:
        if found:
            return target
        started = time.perf_counter()
        examples = gsm8k_sft_examples(folder)
        tokenizer = train_bpe_tokenizer([e["prompt"] + e["response"] for e in examples], vocab_size)
        special_ids = {key: getattr(tokenizer, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
        model = create_small_lm(len(tokenizer), seed=seed, **model_kwargs, **special_ids)
        losses = []
        if sft_steps:
            # The SFT batches are padded to the longest example: leaving out the longest 5% halves a step's cost.
            examples = [e for e in examples
                        if len(tokenizer(e["prompt"] + e["response"])["input_ids"]) < SFT_MAX_TOKENS]
            losses = train_on_responses(model, tokenizer, examples, sft_steps, seed=seed, progress=progress,
                                        description="gsm8k sft")
        info = {"name": LOCAL_MODEL_NAME, "vocab_size": len(tokenizer), "model": model_kwargs, "sft_steps": sft_steps,
                "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
                "train_seconds": round(time.perf_counter() - started, 1)}
        return save_to_cache(model, tokenizer, info, target)


def local_model_for(config: RunConfig, cache_dir: str, progress: bool = False) -> Path:
    """`gsm8k-local-small` for a run config: its model size, `model.init_steps` and (with data.source gsm8k)
    `data.path`'s train.jsonl."""
    folder = config.data.path if config.data.source == "gsm8k" and config.data.path else None
    return build_local_gsm8k_model(cache_dir, model_kwargs=small_lm_kwargs(config.model),
                                   sft_steps=config.model.init_steps.get(LOCAL_MODEL_NAME, 0), folder=folder,
                                   progress=progress)


# ------------------------------------------------------------------------------------------- the task

def retention_examples(folder: Path, tokenizer, chat: bool, limit: int) -> list[dict]:
    """A seeded `limit` of train.jsonl's solutions (no pair asks their questions) as {"prompt", "response"}
    texts, rendered like the pairs."""
    examples = cap(gsm8k_sft_examples(folder), limit)
    if not chat:
        return examples
    return [render_response(tokenizer, user_turn(e["question"]), assistant_turn(e["response"]), "train.jsonl")
            for e in examples]


def gsm8k_evaluator(config: RunConfig, tokenizer, eval_questions: list[dict], folder: Path, chat: bool):
    """model → {accuracy, accuracy_flexible} on `eval_questions` (when `data.eval_questions` > 0) and
    {retention_logp} on `data.retention_answers` train.jsonl solutions (when > 0)."""
    data_cfg = config.data
    prompts = [chat_prompt(tokenizer, q["question"]) if chat else q["prompt"] for q in eval_questions]
    answers = [q["answer"] for q in eval_questions]
    stop_ids = {tokenizer.eos_token_id} | ({end_of_turn_id(tokenizer)} - {None} if chat else set())
    engine = resolve_engine(data_cfg.eval_engine, torch.cuda.is_available(), "data.eval_engine")
    retention = None
    if data_cfg.retention_answers:
        retention = retention_evaluator(retention_examples(folder, tokenizer, chat, data_cfg.retention_answers),
                                        tokenizer, config)

    def evaluate(model) -> dict[str, float]:
        metrics = {}
        if prompts:
            metrics.update(gsm8k_accuracy(model, tokenizer, prompts, answers, max_new_tokens=data_cfg.max_new_tokens,
                                          stop_ids=stop_ids, engine=engine, dtype=config.model.dtype))
        if retention:
            metrics.update(retention(model))
        return metrics
    return evaluate


def gsm8k_splits(config: RunConfig, tokenizer):
    """GSM8K pairs split by question (over all 1319, so the accuracy questions are held out too), rendered
    with the chat template where `data.chat_template` says so, and the evaluator (`gsm8k_evaluator`) on the
    first `data.eval_questions` held-out questions."""
    data_cfg = config.data
    folder = Path(data_cfg.path) if data_cfg.path else data_dir()
    chat = uses_chat_template(data_cfg, tokenizer)
    questions = gsm8k_questions(folder)
    held_out = eval_keys([q["prompt"] for q in questions], data_cfg.eval_fraction)
    report = PairReport(sources=[str(folder / "example_model_solutions.jsonl")])
    rows = {False: [], True: []}  # held out → (label, pair), split by question before any rendering
    for number, (q, pair) in enumerate(((q, pair) for q in questions for pair in gsm8k_pairs([q], chat)), start=1):
        rows[q["prompt"] in held_out].append((f"pair {number}", pair))
    train, eval_pairs = (rows_to_pairs(rows[side], report.sources[0], {c: c for c in PAIR_COLUMNS}, tokenizer,
                                       report) for side in (False, True))
    train, eval_pairs, report = finish_splits(train, eval_pairs, data_cfg, tokenizer, report)
    eval_questions = [q for q in questions if q["prompt"] in held_out][:data_cfg.eval_questions]
    sampling = sampling_source(tokenizer, chat, [q for q in questions if q["prompt"] not in held_out],
                               [q for q in questions if q["prompt"] in held_out])
    return train, eval_pairs, report, gsm8k_evaluator(config, tokenizer, eval_questions, folder, chat), sampling


def sampling_source(tokenizer, chat: bool, train: list[dict], held_out: list[dict]) -> SamplingSource:
    """For data.sampled_pairs: the questions of each side, a sample judged by its stated answer
    (`stated_answer`: the `A:`/`####` answer, else the final number), the ground truth as the gold one."""
    def render(question: str, solution: str) -> str:
        if chat:
            return render_response(tokenizer, user_turn(question), assistant_turn(solution), "gsm8k")["response"]
        return " " + solution.strip()

    def prompts(side: list[dict]) -> list[SamplePrompt]:
        return [SamplePrompt(text=chat_prompt(tokenizer, q["question"]) if chat else q["prompt"], answer=q["answer"],
                             gold=render(q["question"], q["chosen"]), question=q["question"]) for q in side]

    stop_ids = {tokenizer.eos_token_id} | ({end_of_turn_id(tokenizer)} - {None} if chat else set())
    return SamplingSource(train=prompts(train), eval=prompts(held_out),
                          check=lambda reply, answer: stated_answer(reply) == answer,
                          response_text=lambda prompt, reply: render(prompt.question, reply), stop_ids=stop_ids)


def load_task(config: RunConfig, policy_path: str, reference_path: str) -> Task:
    """GSM8K's pairs with the policy's tokenizer (or `data.tokenizer`), and its accuracy as the evaluator."""
    tokenizer = task_tokenizer(config, policy_path)
    train, eval_pairs, report, evaluate, sampling = gsm8k_splits(config, tokenizer)
    task = pair_task(config, policy_path, reference_path, tokenizer, train, eval_pairs, report, evaluate)
    task.sampling = sampling
    return task
