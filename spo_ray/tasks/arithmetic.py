"""The built-in arithmetic-reasoning task (`data.source: arithmetic`): problems, an error model, a tokenizer,
the data sets, the built-in initializations, the evaluator and the `Task` they make.

A prompt looks like ``"Q: 47+85=?\\nA:"`` and the response is the answer's digits and nothing else (no
leading space); the data layer appends the EOS token when it tokenizes, so the response *text* never holds
it. Answers are written least-significant digit first by default (``reverse_answer=True``): 47+85=132 is
answered ``"231"``. MISSION §3's calibration found that a sub-million-parameter model learns reversed
answers in about a minute on a CPU and barely learns the usual order in the same budget, because reversed
digits are produced in the order the carries are computed.

The error model (`mistakes`) produces the plausible wrong answers a careless student writes: a dropped
carry or borrow, one digit off by one, two adjacent digits swapped. The *base* initialization is trained on
a corpus where `mistake_rate` of the answers are such mistakes, so it is biased towards them; preference
pairs use them as rejected responses; the evaluator measures how much probability sits on them.

Train and eval problems are disjoint for every seed: a problem belongs to the eval split when a fixed hash
of it (independent of the seed, and of operand order for "+") falls below `eval_fraction`. So a base model
built with one seed never saw the held-out problems of any other seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from spo_ray.config import RunConfig
from spo_ray.decoding import Decoder, encode_prompts, evaluating, greedy_decode
from spo_ray.models import (cached_init, create_small_lm, load_init, resolved_model_kwargs, save_to_cache,
                            small_lm_kwargs, train_on_responses)
from spo_ray.sampling import SamplePrompt, SamplingSource
from spo_ray.tasks.task import Task

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Everything a prompt, an answer or the optional working can contain.
CHARACTERS = tuple("0123456789") + tuple("+-=?QA:,|") + (" ", "\n")
OPERATIONS = ("+", "-")
# Separates the optional working from the answer: "7+5=12,4+8+1=13|231".
WORKING_END = "|"


@dataclass(frozen=True)
class ArithmeticConfig:
    """Everything that defines the task's problems and data sets (plain data, hashable, `key()` for caches)."""

    min_digits: int = 2  # operand digits
    max_digits: int = 2
    operations: tuple[str, ...] = ("+",)  # "+" and/or "-" (for "-" the larger operand comes first)
    reverse_answer: bool = True  # least-significant digit first (see module docstring)
    working: bool = False  # column-by-column working before the answer, e.g. "7+5=12,4+8+1=13|231"
    mistake_rate: float = 0.4  # share of noisy pretraining answers replaced by an error-model mistake
    pretrain_examples: int = 50_000
    sft_examples: int = 20_000
    train_pairs: int = 2000
    eval_pairs: int = 256
    eval_problems: int = 200
    eval_fraction: float = 0.2  # share of all problems reserved for evaluation
    seed: int = 0

    def __post_init__(self):
        # Accept lists from YAML; keep the dataclass hashable.
        object.__setattr__(self, "operations", tuple(self.operations))
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ValueError(f"mistake_rate must be in [0, 1], got {self.mistake_rate}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def key(self) -> str:
        """A stable JSON string of every field, for cache keys."""
        return json.dumps(asdict(self), sort_keys=True)


# --------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, nothing added around the text.

    A BPE model with no merges and no pre-tokenizer splits the text into single characters; the `Fuse`
    decoder joins them back without spaces, so `decode(encode(s)) == s`.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
    )


# ------------------------------------------------------------------------------------------- arithmetic


def solve(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, padded with zeros to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


def _column_sum(a: int, b: int, op: str, dropped: set[int] | None = None) -> int:
    """Schoolbook column arithmetic, forgetting the carry (or borrow) *out of* the columns in `dropped`.

    Column `len(digits)-1`'s carry is the final carry-out of an addition (forgetting it writes 32 for
    47+85). With `dropped` empty this is the exact result.
    """
    dropped = dropped or set()
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    result, carry = 0, 0
    for i in range(width):
        column = da[i] + db[i] + carry if op == "+" else da[i] - db[i] - carry
        if op == "+":
            digit, carry = column % 10, column // 10
        else:
            digit, carry = column % 10, int(column < 0)
        if i in dropped:
            carry = 0
        result += digit * 10**i
    if op == "+":
        result += carry * 10**width  # the final carry-out, unless dropped above
    return result


def _carry_columns(a: int, b: int, op: str) -> list[int]:
    """The columns whose carry (or borrow) is non-zero in the exact computation."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    columns, carry = [], 0
    for i in range(width):
        column = da[i] + db[i] + carry if op == "+" else da[i] - db[i] - carry
        carry = column // 10 if op == "+" else int(column < 0)
        if carry:
            columns.append(i)
    return columns


def classified_mistakes(a: int, b: int, op: str) -> list[tuple[str, int]]:
    """Every error-model mistake as (kind, value), in a fixed order, distinct values, never the answer.

    Kinds: "dropped_carry" (one carry or borrow forgotten, or all of them), "off_by_one" (one digit of the
    answer one higher or lower), "swapped_digits" (two adjacent digits of the answer exchanged). Values are
    never negative, and no slip or swap turns the leading digit into a zero.
    """
    answer = solve(a, b, op)
    candidates: list[tuple[str, int]] = []
    carries = _carry_columns(a, b, op)
    for column in carries:
        candidates.append(("dropped_carry", _column_sum(a, b, op, {column})))
    if len(carries) > 1:
        candidates.append(("dropped_carry", _column_sum(a, b, op, set(carries))))
    text = str(answer)
    for i, ch in enumerate(text):  # natural order, most significant digit first
        for step in (-1, 1):
            digit = int(ch) + step
            if 0 <= digit <= 9 and not (i == 0 and digit == 0 and len(text) > 1):  # no "032" for 132
                candidates.append(("off_by_one", int(text[:i] + str(digit) + text[i + 1 :])))
    for i in range(len(text) - 1):
        swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if swapped[0] != "0":
            candidates.append(("swapped_digits", int(swapped)))
    seen = {answer}
    distinct = []
    for kind, value in candidates:
        if value not in seen and value >= 0:
            seen.add(value)
            distinct.append((kind, value))
    return distinct


def mistakes(a: int, b: int, op: str) -> list[int]:
    """The distinct wrong values of the error model for a op b (deterministic; see `classified_mistakes`)."""
    return [value for _, value in classified_mistakes(a, b, op)]


def sample_mistake(a: int, b: int, op: str, rng: random.Random) -> int:
    """One mistake: a kind uniformly among those possible for this problem, then a value of that kind.

    Choosing the kind first keeps dropped carries as common as off-by-one slips, although a 3-digit answer
    has up to six off-by-one variants and only one or two dropped-carry ones.
    """
    by_kind: dict[str, list[int]] = {}
    for kind, value in classified_mistakes(a, b, op):
        by_kind.setdefault(kind, []).append(value)
    kind = rng.choice(sorted(by_kind))
    return rng.choice(by_kind[kind])


# ------------------------------------------------------------------------------------------- formatting


def format_prompt(a: int, b: int, op: str) -> str:
    return f"Q: {a}{op}{b}=?\nA:"


def format_answer(value: int, cfg: ArithmeticConfig) -> str:
    """The answer's digits, reversed when `cfg.reverse_answer` (132 -> "231")."""
    text = str(value)
    return text[::-1] if cfg.reverse_answer else text


def format_working(a: int, b: int, op: str) -> str:
    """Column-by-column working, least significant column first, ending with `WORKING_END`.

    47+85 -> "7+5=12,4+8+1=13|"; 52-17 -> "2-7=-5,5-1-1=3|". A column shows its incoming carry (or borrow)
    as "+1" ("-1") and its raw result, so each step is a one-digit fact the model can check.
    """
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, carry = [], 0
    for i in range(width):
        if op == "+":
            column = da[i] + db[i] + carry
            steps.append(f"{da[i]}+{db[i]}{'+1' if carry else ''}={column}")
            carry = column // 10
        else:
            column = da[i] - db[i] - carry
            steps.append(f"{da[i]}-{db[i]}{'-1' if carry else ''}={column}")
            carry = int(column < 0)
    return ",".join(steps) + WORKING_END


def format_response(a: int, b: int, op: str, value: int, cfg: ArithmeticConfig) -> str:
    """The response text for answer `value` (the working, when enabled, is always the correct one)."""
    working = format_working(a, b, op) if cfg.working else ""
    return working + format_answer(value, cfg)


def parse_answer(text: str, cfg: ArithmeticConfig) -> int | None:
    """The integer a response states, or None when it states none (empty, non-digits, wrong format).

    With working, the answer is what follows the last `WORKING_END`. Leading/trailing whitespace is ignored.
    """
    if cfg.working:
        if WORKING_END not in text:
            return None
        text = text.rsplit(WORKING_END, 1)[1]
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text[::-1] if cfg.reverse_answer else text)


def max_answer_digits(cfg: ArithmeticConfig) -> int:
    """L: the most digits any answer of this config can have (a sum can carry into one extra digit)."""
    return cfg.max_digits + (1 if "+" in cfg.operations else 0)


# --------------------------------------------------------------------------------------------- problems


def _operand_range(cfg: ArithmeticConfig) -> range:
    low = 0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
    return range(low, 10**cfg.max_digits)


def is_eval_problem(a: int, b: int, op: str, eval_fraction: float) -> bool:
    """The fixed train/eval partition: a seed-independent hash of the problem (operand order ignored for +)."""
    if op == "+":
        a, b = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def all_problems(cfg: ArithmeticConfig, split: str) -> list[tuple[int, int, str]]:
    """Every (a, b, op) of the split, in a fixed order. For "-" only a >= b, so results are non-negative."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    operands = _operand_range(cfg)
    return [
        (a, b, op)
        for op in cfg.operations
        for a in operands
        for b in operands
        if (op == "+" or a >= b) and is_eval_problem(a, b, op, cfg.eval_fraction) == want_eval
    ]


def _rng(cfg: ArithmeticConfig, purpose: str) -> random.Random:
    """A generator per (seed, purpose), so each data set is reproducible on its own."""
    return random.Random(f"{cfg.seed}:{purpose}")


def _sample(problems: list, n: int, rng: random.Random) -> list:
    """n problems, without replacement while the pool lasts (then with)."""
    if n <= len(problems):
        return rng.sample(problems, n)
    return [rng.choice(problems) for _ in range(n)]


def pretraining_texts(cfg: ArithmeticConfig) -> list[dict]:
    """The noisy base corpus: `{"prompt", "response"}` on train problems, `mistake_rate` of them mistaken.

    Full text = prompt + response (+ EOS at tokenization). Kept as two fields so a trainer can choose
    which tokens carry the loss.
    """
    rng = _rng(cfg, "pretrain")
    examples = []
    for a, b, op in _sample(all_problems(cfg, "train"), cfg.pretrain_examples, rng):
        value = sample_mistake(a, b, op, rng) if rng.random() < cfg.mistake_rate else solve(a, b, op)
        examples.append({"prompt": format_prompt(a, b, op), "response": format_response(a, b, op, value, cfg)})
    return examples


def sft_pairs(cfg: ArithmeticConfig) -> list[dict]:
    """`{"prompt", "response"}` with correct answers on train problems (the SFT inits' data)."""
    rng = _rng(cfg, "sft")
    return [
        {"prompt": format_prompt(a, b, op), "response": format_response(a, b, op, solve(a, b, op), cfg)}
        for a, b, op in _sample(all_problems(cfg, "train"), cfg.sft_examples, rng)
    ]


def preference_pairs(cfg: ArithmeticConfig, split: str = "train") -> list[dict]:
    """Preference pairs: chosen = the correct answer, rejected = an error-model mistake.

    Each row: `{"prompt", "chosen", "rejected", "answer", "mistakes"}`; `train_pairs` rows from the train
    split or `eval_pairs` from the eval split.
    """
    rng = _rng(cfg, f"pairs:{split}")
    n = cfg.train_pairs if split == "train" else cfg.eval_pairs
    rows = []
    for a, b, op in _sample(all_problems(cfg, split), n, rng):
        answer = solve(a, b, op)
        rows.append(
            {
                "prompt": format_prompt(a, b, op),
                "chosen": format_response(a, b, op, answer, cfg),
                "rejected": format_response(a, b, op, sample_mistake(a, b, op, rng), cfg),
                "answer": answer,
                "mistakes": mistakes(a, b, op),
            }
        )
    return rows


def eval_problems(cfg: ArithmeticConfig) -> list[dict]:
    """Held-out problems for accuracy and the mass split: `{"prompt", "answer", "mistakes"}`.

    Distinct problems (all of the eval split when it has fewer than `eval_problems`).
    """
    pool = all_problems(cfg, "eval")
    chosen = _rng(cfg, "eval_problems").sample(pool, min(cfg.eval_problems, len(pool)))
    return [
        {"prompt": format_prompt(a, b, op), "answer": solve(a, b, op), "mistakes": mistakes(a, b, op)}
        for a, b, op in chosen
    ]


# ------------------------------------------------------------------------------------ initializations
#
# The paper's second finding is that DPO's outcome depends on where the policy starts, so the initialization
# is a sweep axis (`model.init`). The built-in ones:
#
# - `scratch`: an untrained model (for tests and as a control);
# - `base`: trained from scratch on the noisy corpus (`pretraining_texts`), where `mistake_rate` of the
#   answers are error-model mistakes, so it is biased towards plausible wrong answers;
# - `sft_short` / `sft_long`: the base, fine-tuned on correct answers (`sft_pairs`) for a short and a long
#   schedule — the lower-level (SFT) problem of SPO solved partly and nearly fully.
#
# Each is built once into `cache_dir/<name>-<key>/` (`spo_ray.models.save_to_cache`) and reused by every
# trial; the key hashes everything that changes the weights.

# Bump when a change to the inits' code or to the task's data builders changes what an init contains.
INIT_CODE_VERSION = 2
INIT_NAMES = ("scratch", "base", "sft_short", "sft_long")
# base: trained on the noisy corpus (40% mistakes); sft_short: a partial correction (30 steps, still in
# warm-up), sft_long: a near-complete one (600 steps) — the two ends of the lower-level (SFT) problem.
DEFAULT_INIT_STEPS = {"scratch": 0, "base": 1500, "sft_short": 30, "sft_long": 600}


# How many preference pairs and evaluation problems a sweep uses does not change an init's weights, so those
# fields stay out of its cache key: sweeps that differ only in them share one init.
_NOT_IN_INIT_KEY = ("train_pairs", "eval_pairs", "eval_problems")


def init_task_fields(task_cfg: ArithmeticConfig) -> dict:
    return {k: v for k, v in asdict(task_cfg).items() if k not in _NOT_IN_INIT_KEY}


def init_dir(name: str, task_cfg: ArithmeticConfig, model_kwargs: dict | None, cache_dir: str | Path, *,
             steps: int | None = None, base_steps: int | None = None) -> Path:
    """Where `build_arithmetic_init` keeps (or will keep) this init: `cache_dir/<name>-<key>`."""
    if name not in INIT_NAMES:
        raise ValueError(f"init must be one of {INIT_NAMES}, got {name!r}")
    description = {
        "name": name,
        "task": init_task_fields(task_cfg),
        "model": resolved_model_kwargs(model_kwargs),
        "steps": DEFAULT_INIT_STEPS[name] if steps is None else steps,
        "code_version": INIT_CODE_VERSION,
    }
    if name.startswith("sft"):
        description["base"] = init_dir("base", task_cfg, model_kwargs, cache_dir, steps=base_steps).name
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}-{key}"


def build_arithmetic_init(name: str, task_cfg: ArithmeticConfig, model_kwargs: dict | None,
                          cache_dir: str | Path, *, steps: int | None = None, base_steps: int | None = None,
                          progress: bool = True) -> Path:
    """Build the init `name` (see the section comment above) unless cached; return its directory.

    `steps` overrides the training steps of `name` (`DEFAULT_INIT_STEPS`), `base_steps` those of the base an
    SFT init starts from (built first through this same function, so cached too).
    """
    target = init_dir(name, task_cfg, model_kwargs, cache_dir, steps=steps, base_steps=base_steps)
    with cached_init(target) as found:
        if found:
            return target
        steps = DEFAULT_INIT_STEPS[name] if steps is None else steps
        tokenizer = make_tokenizer()
        started = time.perf_counter()
        if name == "scratch" or name == "base":
            special_ids = {key: getattr(tokenizer, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
            model = create_small_lm(len(tokenizer), **resolved_model_kwargs(model_kwargs), **special_ids)
            examples = pretraining_texts(task_cfg) if name == "base" else []
            base_path = None
        else:
            base_path = build_arithmetic_init("base", task_cfg, model_kwargs, cache_dir, steps=base_steps,
                                              progress=progress)
            model, tokenizer = load_init(base_path)
            examples = sft_pairs(task_cfg)
        losses = []
        if steps > 0:
            losses = train_on_responses(model, tokenizer, examples, steps, seed=task_cfg.seed, progress=progress,
                                        description=f"init {name}")
        info = {
            "name": name,
            "task": asdict(task_cfg),
            "model": resolved_model_kwargs(model_kwargs),
            "steps": steps,
            "base": str(base_path) if base_path else None,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
            "train_seconds": round(time.perf_counter() - started, 1),
            "code_version": INIT_CODE_VERSION,
        }
        return save_to_cache(model, tokenizer, info, target)


# --------------------------------------------------------------------------------------------- evaluation
#
# Greedy accuracy and the exact split of the answer probability mass. The mass split is the paper's
# "catastrophic preference shift" measured rather than guessed: when DPO pushes a mistaken answer down, where
# does its probability go — to the correct answer, to other known mistakes, to other numbers, or out of the
# space of answers altogether? The answer space is finite, so the four masses are computed exactly by
# scoring the digit tree level by level (`spo_ray.decoding.Decoder`).

MASS_KEYS = ("mass_correct", "mass_mistake", "mass_other", "mass_malformed")


def max_response_tokens(cfg: ArithmeticConfig) -> int:
    """The longest response the task can expect, EOS included (working: at most 10 characters a column)."""
    working = 10 * cfg.max_digits + 1 if cfg.working else 0
    return working + max_answer_digits(cfg) + 1


def greedy_accuracy(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig, batch_size: int = 256,
                    max_new_tokens: int | None = None) -> float:
    """Share of problems whose greedy response, ended by EOS, parses to the correct answer (exact match).

    A response that has not emitted EOS within `max_new_tokens` (default: the longest possible response)
    counts as wrong, so accuracy and `mass_correct` judge the same event.
    """
    if not problems:
        return float("nan")
    max_new_tokens = max_new_tokens or max_response_tokens(cfg)
    responses = greedy_decode(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size)
    correct = 0
    for problem, ids in zip(problems, responses):
        if ids and ids[-1] == tokenizer.eos_token_id:
            correct += parse_answer(tokenizer.decode(ids[:-1]), cfg) == problem["answer"]
    return correct / len(problems)


def _answer_values(length: int, cfg: ArithmeticConfig) -> torch.Tensor:
    """For every digit string of `length` (index = the digits read in generation order as a base-10 number):
    the integer it states if it is well-formed (canonical for this config), else -1."""
    values = []
    for index in range(10**length):
        text = str(index).zfill(length)
        value = parse_answer(text, cfg)
        values.append(value if format_answer(value, cfg) == text else -1)
    return torch.tensor(values, dtype=torch.long)


def answer_mass_split(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig,
                      batch_size: int = 4096) -> dict[str, float]:
    """Exact probability of each kind of response, averaged over problems (each problem's four sum to 1).

    For a problem with answer y and error-model mistakes M, the response (the tokens after the prompt) is
    - `mass_correct`: the answer string of y followed by EOS;
    - `mass_mistake`: the answer string of some m in M followed by EOS;
    - `mass_other`: any other *well-formed* answer followed by EOS, well-formed meaning the canonical digit
      string of an integer with 1..L digits — no superfluous leading zero in the natural (most significant
      first) order, written reversed when `cfg.reverse_answer` — where L = `max_answer_digits(cfg)`;
    - `mass_malformed`: everything else (non-digits, leading zeros, too many digits, never ending): 1 minus
      the other three.

    Exact: the probability of every digit string of length n <= L is the product of its next-token
    probabilities, computed for all strings of length n in one batched step (10**n rows per problem on top
    of the prompt's key/value cache), then multiplied by P(EOS | string). `batch_size` bounds the rows of
    one step (at least one problem's 10**L). Needs `cfg.working == False`: with working the response space is
    not a small digit tree.
    """
    if cfg.working:
        raise ValueError("answer_mass_split needs working=False: responses with working have no finite digit tree")
    length = max_answer_digits(cfg)
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    eos_id = tokenizer.eos_token_id
    values_by_length = [_answer_values(n, cfg) for n in range(1, length + 1)]
    problems_per_batch = max(1, batch_size // 10**length)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, mistake, other
    with evaluating(model):
        for start in range(0, len(problems), problems_per_batch):
            chunk = problems[start : start + problems_per_batch]
            answers = torch.tensor([p["answer"] for p in chunk])[:, None]
            width = max(1, max(len(p["mistakes"]) for p in chunk))
            known_mistakes = torch.full((len(chunk), width), -2)  # -2 matches no value
            for row, p in enumerate(chunk):
                known_mistakes[row, : len(p["mistakes"])] = torch.tensor(p["mistakes"], dtype=torch.long)
            decoder = Decoder(model, encode_prompts(tokenizer, [p["prompt"] for p in chunk]), tokenizer.pad_token_id)
            device = decoder.next_logprobs.device
            prefix_logps = torch.zeros(len(chunk), 1, dtype=torch.float64, device=device)
            for n, values in enumerate(values_by_length, start=1):
                # Children of every prefix: row (problem, prefix, digit), in that order.
                digit_logps = decoder.next_logprobs[:, digit_ids.to(device)].double()
                prefix_logps = (prefix_logps.reshape(-1, 1) + digit_logps).reshape(len(chunk), 10**n)
                decoder.repeat(10)
                decoder.append(digit_ids.to(device).repeat(decoder.last_position.shape[0] // 10))
                ended = (prefix_logps + decoder.next_logprobs[:, eos_id].double().reshape(len(chunk), -1)).exp().cpu()
                is_correct = values[None, :] == answers
                is_mistake = (values[None, :, None] == known_mistakes[:, None, :]).any(dim=-1) & ~is_correct
                is_other = (values[None, :] >= 0) & ~is_correct & ~is_mistake
                totals += torch.stack([(ended * mask).sum() for mask in (is_correct, is_mistake, is_other)])
    correct, mistake, other = (totals / len(problems)).tolist()
    return {
        "mass_correct": correct,
        "mass_mistake": mistake,
        "mass_other": other,
        "mass_malformed": 1.0 - correct - mistake - other,
    }


def evaluate_task(model, tokenizer, problems: list[dict], cfg: ArithmeticConfig) -> dict[str, float]:
    """`{"accuracy", "mass_correct", "mass_mistake", "mass_other", "mass_malformed"}` on `problems`
    (the trainer logs them as `eval/accuracy`, `eval/mass_*`); the masses are left out with working."""
    metrics = {"accuracy": greedy_accuracy(model, tokenizer, problems, cfg)}
    if not cfg.working:
        metrics.update(answer_mass_split(model, tokenizer, problems, cfg))
    return metrics


# ------------------------------------------------------------------------------------------- the task

def task_config(config: RunConfig) -> ArithmeticConfig:
    """The `data.arithmetic` section of a run config as the task's own config."""
    return ArithmeticConfig(**{**config.data.arithmetic.model_dump(),
                               "operations": tuple(config.data.arithmetic.operations)})


def init_for(name: str, config: RunConfig, cache_dir: str, progress: bool = False) -> Path:
    """The built-in init `name` for a run config (its task, model size and `model.init_steps`), built once."""
    steps = config.model.init_steps
    return build_arithmetic_init(name, task_config(config), small_lm_kwargs(config.model), cache_dir,
                                 steps=steps.get(name), base_steps=steps.get("base"), progress=progress)


def load_task(config: RunConfig, policy_path: str, reference_path: str) -> Task:
    """Generated pairs, the character tokenizer and the exact evaluator on held-out problems."""
    task_cfg = task_config(config)
    tokenizer = make_tokenizer()
    problems = eval_problems(task_cfg)
    train_pairs, eval_pairs = preference_pairs(task_cfg, "train"), preference_pairs(task_cfg, "eval")
    return Task(
        name="arithmetic",
        tokenizer=tokenizer,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        policy_path=policy_path,
        reference_path=reference_path,
        evaluate=lambda model: evaluate_task(model, tokenizer, problems, task_cfg),
        sampling=sampling_source(task_cfg, tokenizer, train_pairs, eval_pairs),
    )


def sampling_source(cfg: ArithmeticConfig, tokenizer, train_pairs: list[dict], eval_pairs: list[dict]) -> SamplingSource:
    """For data.sampled_pairs: the distinct prompts of the training and the held-out pairs, an answer judged
    as the evaluator judges it (`parse_answer`: exact, and it must end with EOS), the correct response as
    the gold one."""
    train, held_out = (list({p["prompt"]: SamplePrompt(text=p["prompt"], answer=p["answer"], gold=p["chosen"])
                             for p in pairs}.values()) for pairs in (train_pairs, eval_pairs))
    return SamplingSource(train=train, eval=held_out, check=lambda reply, answer: parse_answer(reply, cfg) == answer,
                          response_text=lambda prompt, reply: reply, stop_ids={tokenizer.eos_token_id})
