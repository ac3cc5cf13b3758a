"""Real preference data (`data.source: files | hub`): local files or a Hugging Face dataset → validated text
pairs → a `Task`. Its validation, splits and tokenizer loading serve the GSM8K source too.

The format is TRL's: columns `prompt`, `chosen`, `rejected` (rename yours with `data.columns`), each either
plain text or a *conversational* list of `{"role", "content"}` messages. Messages are rendered with the
tokenizer's chat template the way TRL does it: the prompt with `add_generation_prompt=True`, a response as
what the template adds to the rendered prompt when the response's turns follow it. A response that repeats
the prompt's messages (a whole conversation) has them removed first.

    data:
      source: files                   # or hub (data.path is a dataset id; name, split, revision)
      path: pairs.jsonl               # .jsonl / .json, .parquet, .csv
      columns: {prompt: question}     # our name: your column

Validation stops at the first bad row with one line naming the file and row (a JSONL line number, else the
1-based row) and column; rows that cannot teach a preference (an empty response, chosen == rejected) are
dropped and counted; the counts come back in a `PairReport` and are printed as one line. Sequences longer
than `data.max_length` are truncated by `spo_ray.data.tokenize_pairs`, which counts them for the report.

The eval split is `data.eval_path` / `data.eval_split` when given, else a seeded `eval_fraction` of the
*prompts*, so that no prompt is on both sides (pairs of one prompt share most of their text).

Capability retention (`data.retention_path`, any source of pairs; GSM8K uses train.jsonl): reference answers
that are in no pair, columns `prompt` and `response` (text or messages, rendered like a pair's), whose
per-token log-prob the evaluation logs as `eval/retention_logp`. Greedy accuracy of a small model is near
zero and cannot show a regression; this log-prob moves with every step that forgets what the model knew.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from spo_ray.answers import matches
from spo_ray.config import ConfigError, DataConfig, RunConfig
from spo_ray.sampling import SamplePrompt, SamplingSource
from spo_ray.tasks.task import Task

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ANSWER_COLUMN = "answer"  # a reference answer per prompt: what data.sampled_pairs checks samples against
# The split and the caps do not depend on the trial's seed: every trial of a sweep must train and evaluate
# on the same pairs to be comparable (and to share one reference log-prob cache).
SPLIT_SEED = 0
FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PairReport:
    """What loading did to the data: rows read, rows dropped and why, pairs kept, pairs truncated."""
    sources: list[str] = field(default_factory=list)
    rows: int = 0
    empty_response: int = 0
    identical: int = 0
    train: int = 0
    eval: int = 0
    truncated: int | None = None  # None: not counted (no tokenizer given)

    def dropped(self) -> str:
        return (f"{self.rows} rows, dropped {self.empty_response} with an empty response and {self.identical} "
                f"with chosen == rejected")

    def summary(self) -> str:
        truncated = "" if self.truncated is None else f", {self.truncated} truncated to max_length"
        return (f"pairs from {' + '.join(self.sources)}: {self.dropped()}; {self.train} train / {self.eval} eval "
                f"pairs{truncated}")


def _first_line(error: Exception) -> str:
    """The first line of a library's error, for a one-line user message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Reading rows: (label, row) where the label names the row in errors ("line 7", "row 3")

def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path} line {number}: malformed JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"line {number}", row))
    return rows


def _read_table(path: Path, kind: str) -> list[tuple[str, dict]]:
    if kind == "csv":
        import pandas as pd
        # Every cell as text, and an empty cell as "" (an empty response), not NaN (a non-string cell).
        records = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict(orient="records")
    else:
        import pyarrow.parquet as pq
        records = pq.read_table(path).to_pylist()  # plain lists and dicts, also for message columns
    return [(f"row {i}", row) for i, row in enumerate(records, start=1)]


def read_file_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a local JSONL / Parquet / CSV file, chosen by its extension."""
    path = Path(path)
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown file type {path.suffix!r} (expected one of {', '.join(FILE_SUFFIXES)})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return _read_jsonl(path) if kind == "jsonl" else _read_table(path, kind)
    except ConfigError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read as {kind} ({_first_line(error)})") from None


def read_hub_rows(dataset_id: str, split: str, data_cfg: DataConfig, columns: list[str]) -> list[tuple[str, dict]]:
    """Rows of a Hugging Face dataset split (`datasets.load_dataset`: a hub id, or a local dataset folder)."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, name=data_cfg.name, split=split, revision=data_cfg.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.path: cannot load dataset {dataset_id!r} split {split!r} ({_first_line(error)})") from None
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ConfigError(_missing_message(f"{dataset_id} (split {split})", missing, dataset.column_names))
    dataset = dataset.select_columns(columns)
    return [(f"row {i}", row) for i, row in enumerate(dataset, start=1)]


def _missing_message(where: str, missing: list[str], present) -> str:
    return (f"{where}: missing column(s) {', '.join(map(repr, missing))} (has {', '.join(map(repr, present))}; "
            f"map yours with data.columns)")


# ---------------------------------------------------------------------------------------------------
# Rows → text pairs

def user_columns(data_cfg: DataConfig) -> dict[str, str]:
    """Our column name → the dataset's, from `data.columns`."""
    known = PAIR_COLUMNS + (ANSWER_COLUMN,)
    unknown = [k for k in data_cfg.columns if k not in known]
    if unknown:
        raise ConfigError(f"data.columns.{unknown[0]}: unknown key (expected {', '.join(known)})")
    return {name: data_cfg.columns.get(name, name) for name in PAIR_COLUMNS}


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _is_blank(value) -> bool:
    """An empty response: blank text, or messages whose contents are all blank."""
    return not value.strip() if isinstance(value, str) else all(not m["content"].strip() for m in value)


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Messages as the text the tokenizer's chat template makes of them."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_response(tokenizer, prompt: list[dict], response: list[dict], where: str) -> dict:
    """One (prompt, response) of messages → {"prompt", "response"} texts, cut as `render_conversation` cuts."""
    pair = render_conversation(tokenizer, prompt, response, response, where)
    return {"prompt": pair["prompt"], "response": pair["chosen"]}


def render_conversation(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict],
                        where: str) -> dict:
    """Messages → texts with the chat template (TRL's convention; see the module docstring)."""
    prompt_text = render_messages(tokenizer, prompt, add_generation_prompt=True)
    pair = {"prompt": prompt_text}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if prompt and response[:len(prompt)] == prompt:  # a whole conversation: keep the response turns
            response = response[len(prompt):]
        full = render_messages(tokenizer, prompt + response, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise ConfigError(f"{where} column {name}: the chat template renders the prompt differently when the "
                              f"response follows it, so the response cannot be cut out")
        pair[name] = full[len(prompt_text):]
    return pair


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def assistant_turn(solution: str) -> list[dict]:
    # No leading space: in a chat the reply starts its own turn (the space is for joined plain text).
    return [{"role": "assistant", "content": solution.strip()}]


def uses_chat_template(data_cfg: DataConfig, tokenizer) -> bool:
    """`data.chat_template`: auto → whether the tokenizer has a chat template (instruct models do)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if data_cfg.chat_template is True and not has_template:
        raise ConfigError("data.chat_template: true, but the tokenizer has no chat template (set it to auto or "
                          "false, or data.tokenizer to one that has)")
    return has_template if data_cfg.chat_template == "auto" else data_cfg.chat_template


def chat_prompt(tokenizer, question: str) -> str:
    """A question as the chat template renders it for the model to answer (with the generation prompt)."""
    return render_messages(tokenizer, user_turn(question), add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`): the first token the template writes after a reply. None where it writes nothing."""
    reply = "4"
    prompt = chat_prompt(tokenizer, "2+2?")
    full = render_messages(tokenizer, user_turn("2+2?") + assistant_turn(reply), add_generation_prompt=False)
    after = full[len(prompt):].split(reply, 1)[-1] if full.startswith(prompt) else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids else None


def rows_to_pairs(rows: list[tuple[str, dict]], source: str, columns: dict[str, str], tokenizer,
                  report: PairReport) -> list[dict]:
    """Validate rows and turn them into text pairs; drop (and count) the ones that teach no preference."""
    pairs = []
    for label, row in rows:
        where = f"{source} {label}"
        missing = [user for user in columns.values() if user not in row]
        if missing:
            raise ConfigError(_missing_message(where, missing, list(row)))
        values = {name: row[user] for name, user in columns.items()}
        for name, value in values.items():
            if not (isinstance(value, str) or _is_messages(value)):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ConfigError(f"{where} column {columns[name]}: expected text or a list of "
                                  f"{{role, content}} messages, got {type(value).__name__} {shown}")
        report.rows += 1
        conversational = [isinstance(v, list) for v in values.values()]
        if any(conversational) and not all(conversational):
            raise ConfigError(f"{where}: prompt, chosen and rejected must all be text or all be messages")
        if _is_blank(values["chosen"]) or _is_blank(values["rejected"]):
            report.empty_response += 1
            continue
        if all(conversational):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"{where}: holds chat messages, but the tokenizer has no chat template "
                                  f"(set data.tokenizer to one that has)")
            values = render_conversation(tokenizer, values["prompt"], values["chosen"], values["rejected"], where)
        if values["chosen"] == values["rejected"]:
            report.identical += 1
            continue
        pairs.append(values)
    return pairs


# ---------------------------------------------------------------------------------------------------
# Splits and caps

def eval_keys(keys, eval_fraction: float, seed: int = SPLIT_SEED) -> set:
    """A seeded `eval_fraction` of the distinct keys (at least one, never all), independent of their order."""
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ConfigError(f"data.eval_fraction: needs at least 2 distinct prompts to split, got {len(distinct)} "
                          f"(give data.eval_path or data.eval_split instead)")
    random.Random(seed).shuffle(distinct)
    count = min(len(distinct) - 1, max(1, math.ceil(eval_fraction * len(distinct))))
    return set(distinct[:count])


def split_by_prompt(pairs: list[dict], eval_fraction: float, seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """(train, eval) with every prompt on one side only."""
    held_out = eval_keys([p["prompt"] for p in pairs], eval_fraction, seed)
    return [p for p in pairs if p["prompt"] not in held_out], [p for p in pairs if p["prompt"] in held_out]


def cap(pairs: list[dict], limit: int | None, seed: int = SPLIT_SEED) -> list[dict]:
    """A seeded random `limit` of the pairs (in their original order), so a cap does not keep only the
    head of a sorted file."""
    if limit is None or len(pairs) <= limit:
        return pairs
    kept = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in kept]


def finish_splits(train: list[dict], eval_pairs: list[dict], data_cfg: DataConfig, tokenizer,
                  report: PairReport) -> tuple[list[dict], list[dict], PairReport]:
    """Caps, the empty-dataset check and the counts every source shares (GSM8K too)."""
    train, eval_pairs = cap(train, data_cfg.max_train_pairs), cap(eval_pairs, data_cfg.max_eval_pairs)
    for name, pairs in (("training", train), ("evaluation", eval_pairs)):
        if not pairs:
            sources = " + ".join(dict.fromkeys(report.sources))
            raise ConfigError(f"{sources}: no {name} pairs left after filtering ({report.dropped()})")
    report.train, report.eval = len(train), len(eval_pairs)
    if tokenizer is not None:
        from spo_ray.data import tokenize_pairs
        report.truncated = sum(tokenize_pairs(pairs, tokenizer, data_cfg.max_length)[1].truncated
                               for pairs in (train, eval_pairs))
    return train, eval_pairs, report


def read_rows(data_cfg: DataConfig, which: str, columns: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    """(source name, rows) of one side: `which="train"` reads `data.path` (`data.split` on the hub),
    `which="eval"` reads `data.eval_path` and/or `data.eval_split`."""
    path = data_cfg.path if which == "train" else (data_cfg.eval_path or data_cfg.path)
    if not path:
        raise ConfigError(f"data.path: required for data.source {data_cfg.source}")
    if data_cfg.source == "hub":
        split = data_cfg.split if which == "train" else (data_cfg.eval_split or data_cfg.split)
        return f"{path}:{split}", read_hub_rows(path, split, data_cfg, list(dict.fromkeys(columns)))
    return str(path), read_file_rows(path)


def read_pairs(data_cfg: DataConfig, which: str = "train", tokenizer=None,
               report: PairReport | None = None) -> tuple[list[dict], PairReport]:
    """The validated text pairs of one side (`read_rows`)."""
    report = report or PairReport()
    columns = user_columns(data_cfg)
    source, rows = read_rows(data_cfg, which, list(columns.values()))
    report.sources.append(source)
    return rows_to_pairs(rows, source, columns, tokenizer, report), report


def load_pairs(data_cfg: DataConfig, tokenizer=None) -> tuple[list[dict], list[dict], PairReport]:
    """(train pairs, eval pairs, report) for `data.source` files or hub (see the module docstring).

    `tokenizer` renders conversational data and counts truncation; text-only data needs none.
    """
    if data_cfg.source == "files" and data_cfg.eval_split:
        raise ConfigError("data.eval_split: only for data.source hub; give local eval pairs with data.eval_path")
    train, report = read_pairs(data_cfg, "train", tokenizer)
    if data_cfg.eval_path or data_cfg.eval_split:
        eval_pairs, report = read_pairs(data_cfg, "eval", tokenizer, report)
    else:
        train, eval_pairs = split_by_prompt(train, data_cfg.eval_fraction) if train else ([], [])
    return finish_splits(train, eval_pairs, data_cfg, tokenizer, report)


# ---------------------------------------------------------------------------------------------------
# Prompts with reference answers, for data.sampled_pairs

def rows_to_prompts(rows: list[tuple[str, dict]], source: str, data_cfg: DataConfig, tokenizer) -> list[SamplePrompt]:
    """Rows with a prompt and an answer column (and, optionally, a chosen one: the gold response) → prompts
    to sample. A conversational prompt is rendered with the chat template and kept for rendering replies."""
    columns = user_columns(data_cfg)
    prompt_column, answer_column = columns["prompt"], data_cfg.columns.get(ANSWER_COLUMN, ANSWER_COLUMN)
    prompts = []
    for label, row in rows:
        where = f"{source} {label}"
        missing = [c for c in (prompt_column, answer_column) if c not in row]
        if missing:
            raise ConfigError(_missing_message(where, missing, list(row)) + "; data.sampled_pairs checks samples "
                              "against a reference answer per prompt")
        prompt, answer, gold = row[prompt_column], row[answer_column], row.get(columns["chosen"])
        if not (isinstance(answer, (int, float, str)) and not isinstance(answer, bool)) or _is_blank(str(answer)):
            raise ConfigError(f"{where} column {answer_column}: expected a number or text, got {answer!r}")
        if _is_messages(prompt):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"{where}: holds chat messages, but the tokenizer has no chat template")
            text = render_messages(tokenizer, prompt, add_generation_prompt=True)
            if _is_messages(gold):
                gold = render_conversation(tokenizer, prompt, gold, gold, where)["chosen"]
            prompts.append(SamplePrompt(text=text, answer=answer, gold=gold if isinstance(gold, str) else None,
                                        question=tuple(tuple(sorted(m.items())) for m in prompt)))
        elif isinstance(prompt, str) and prompt.strip():
            prompts.append(SamplePrompt(text=prompt, answer=answer, gold=gold if isinstance(gold, str) else None))
        else:
            raise ConfigError(f"{where} column {prompt_column}: expected text or a list of {{role, content}} messages")
    return prompts


def load_prompts(data_cfg: DataConfig, tokenizer) -> tuple[list[SamplePrompt], list[SamplePrompt]]:
    """(training prompts, held-out prompts) of `data.source` files or hub, split like the pairs."""
    columns = [*user_columns(data_cfg).values(), data_cfg.columns.get(ANSWER_COLUMN, ANSWER_COLUMN)]
    optional = user_columns(data_cfg)["rejected"], user_columns(data_cfg)["chosen"]
    if data_cfg.source == "hub":  # a hub split is read by column: ask only for what prompts need
        columns = [c for c in columns if c not in optional]
    source, rows = read_rows(data_cfg, "train", columns)
    train = rows_to_prompts(rows, source, data_cfg, tokenizer)
    if data_cfg.eval_path or data_cfg.eval_split:
        source, rows = read_rows(data_cfg, "eval", columns)
        return train, rows_to_prompts(rows, source, data_cfg, tokenizer)
    held_out = eval_keys([p.text for p in train], data_cfg.eval_fraction)
    return [p for p in train if p.text not in held_out], [p for p in train if p.text in held_out]


def reply_renderer(tokenizer):
    """A sampled reply as a pair's response: after a conversational prompt, through the chat template (the
    response is what the template adds after the prompt); after a text prompt, the completion as sampled."""
    def response_text(prompt: SamplePrompt, completion: str) -> str:
        if prompt.question is None:
            return completion
        messages = [dict(m) for m in prompt.question]
        return render_response(tokenizer, messages, [{"role": "assistant", "content": completion.strip()}],
                               "sampled reply")["response"]
    return response_text


def prompt_task(config: RunConfig, policy_path: str, reference_path: str, tokenizer, evaluate=None) -> Task:
    """The Task of files/hub prompts for data.sampled_pairs: no pairs yet (the sampler makes them), the
    prompts with their answers (checked by `spo_ray.answers.matches`: a number by the reply's final number,
    text by the reply's end)."""
    train, held_out = load_prompts(config.data, tokenizer)
    stop_ids = {tokenizer.eos_token_id} | ({end_of_turn_id(tokenizer)} - {None}
                                            if getattr(tokenizer, "chat_template", None) else set())
    sampling = SamplingSource(train=train, eval=held_out, check=matches, response_text=reply_renderer(tokenizer),
                              stop_ids=stop_ids)
    print(f"prompts from {config.data.path}: {len(train)} train / {len(held_out)} held out, with answers")
    return Task(name=config.data.source, tokenizer=tokenizer, train_pairs=[], eval_pairs=[], policy_path=policy_path,
                reference_path=reference_path, evaluate=evaluate, sampling=sampling)


# ---------------------------------------------------------------------------------------------------
# Capability retention: the per-token log-prob of reference answers that are in no pair

def read_retention_examples(path: str | Path, tokenizer, limit: int) -> list[dict]:
    """A seeded `limit` of the `prompt` / `response` rows of a local file (`data.retention_path`), as texts."""
    examples = []
    for label, row in read_file_rows(path):
        where = f"{path} {label}"
        missing = [c for c in ("prompt", "response") if c not in row]
        if missing:
            raise ConfigError(_missing_message(where, missing, list(row)))
        prompt, response = row["prompt"], row["response"]
        if _is_messages(prompt) and _is_messages(response):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"{where}: holds chat messages, but the tokenizer has no chat template")
            examples.append(render_response(tokenizer, prompt, response, where))
        elif isinstance(prompt, str) and isinstance(response, str):
            examples.append({"prompt": prompt, "response": response})
        else:
            raise ConfigError(f"{where}: prompt and response must both be text or both be chat messages")
    return cap(examples, limit)


def retention_evaluator(examples: list[dict], tokenizer, config: RunConfig):
    """model → {"retention_logp": Σ log π(response) / Σ |response|} over `examples` ({"prompt", "response"}
    texts), tokenized exactly like a pair's chosen side (`spo_ray.data.tokenize_pairs`, the same truncation)
    and batched by `train.eval_batch_tokens`."""
    from spo_ray.data import tokenize_pairs
    from spo_ray.decoding import evaluating
    from spo_ray.logprobs import response_logp_per_token

    tokenized, _ = tokenize_pairs([{"prompt": e["prompt"], "chosen": e["response"], "rejected": e["response"]}
                                   for e in examples], tokenizer, config.data.max_length)
    rows = [(pair.prompt_ids, pair.chosen_ids) for pair in tokenized]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def evaluate(model) -> dict[str, float]:
        with evaluating(model):
            return {"retention_logp": response_logp_per_token(model, rows, pad_id, config.train.eval_batch_tokens)}
    return evaluate


# ---------------------------------------------------------------------------------------------------
# The task

def load_tokenizer(path: str, trust_remote_code: bool, key: str):
    """`AutoTokenizer` from a folder or hub id; pad = EOS where the tokenizer has no pad token (as most
    causal LMs): padding is masked everywhere, so which id fills it does not matter."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r} ({_first_line(error)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pair_task(config: RunConfig, policy_path: str, reference_path: str, tokenizer, train: list[dict],
              eval_pairs: list[dict], report: PairReport, evaluate=None) -> Task:
    """The `Task` of a source of text pairs (files, hub, GSM8K), its report printed and kept as a note."""
    print(report.summary())
    return Task(name=config.data.source, tokenizer=tokenizer, train_pairs=train, eval_pairs=eval_pairs,
                policy_path=policy_path, reference_path=reference_path, evaluate=evaluate,
                notes=[report.summary()])


def task_tokenizer(config: RunConfig, policy_path: str):
    """`data.tokenizer`, else the policy's own tokenizer."""
    key = "data.tokenizer" if config.data.tokenizer else "model.init"
    return load_tokenizer(config.data.tokenizer or policy_path, config.model.trust_remote_code, key)


def load_task(config: RunConfig, policy_path: str, reference_path: str) -> Task:
    """The `Task` of `data.source` files or hub: validated pairs and the policy's tokenizer; the evaluator
    logs retention when `data.retention_path` names reference answers."""
    tokenizer = task_tokenizer(config, policy_path)
    evaluate = None
    if config.data.retention_path and config.data.retention_answers:
        examples = read_retention_examples(config.data.retention_path, tokenizer, config.data.retention_answers)
        evaluate = retention_evaluator(examples, tokenizer, config)
    if config.data.sampled_pairs is not None:  # prompts and answers; the sampler makes the pairs
        return prompt_task(config, policy_path, reference_path, tokenizer, evaluate)
    train, eval_pairs, report = load_pairs(config.data, tokenizer)
    return pair_task(config, policy_path, reference_path, tokenizer, train, eval_pairs, report, evaluate)
