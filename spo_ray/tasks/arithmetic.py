"""The built-in arithmetic-reasoning task: problems, an error model, a tokenizer and the data sets.

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
from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

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
