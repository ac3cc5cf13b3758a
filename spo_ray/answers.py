"""Reading a numeric answer out of free text: the checker every source that can verify an answer shares.

The rule (`final_number`): the answer is the **last number in the reply that is not negated**.

- A number is an optional minus sign, digits with optional thousands commas, an optional decimal part:
  ``-3``, ``1,234``, ``12.5``, ``$40``. A minus sign counts only where it is not a subtraction: directly
  before the digits and not after a digit or letter (``= -3`` is −3; ``12-5`` and ``12 - 5`` hold 12 and 5).
  A sentence's full stop is not a decimal point (``5.`` is 5); commas group thousands only in groups of
  three (``1,234`` is 1234; ``12, 13`` is two numbers).
- A number right after a negation — ``not``, ``isn't``, ``is not``, ``no``, ``never``, ``rather than``,
  ``instead of`` — is one the reply rules out: ``12, not 13`` answers 12.
- The last remaining number wins: a reply that works towards its answer (``7 + 5 = 12``) ends on it.

Integral values come back as int (``18.0`` → 18), so answers compare equal across formats.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"(?<![\w.])(?P<sign>-)?\$?(?P<digits>\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?P<fraction>\.\d+)?(?!\w)"
                    r"|(?<![\w.,])\$?(?P<bare_fraction>\.\d+)")
# Words that rule the number after them out; "n't" covers isn't, wasn't, doesn't.
NEGATION = re.compile(r"(?:\bnot|n't|\bno|\bnever|\brather than|\binstead of)\s*(?:equal to\s*|equals?\s*)?\$?-?$",
                      re.IGNORECASE)


def _value(match: re.Match) -> int | float:
    if match["bare_fraction"]:
        value = float(match["bare_fraction"])
    else:
        value = float(match["digits"].replace(",", "") + (match["fraction"] or ""))
        value = -value if match["sign"] else value
    return int(value) if value.is_integer() else value


def numbers(text: str) -> list[int | float]:
    """Every number in the text, in order (see the module docstring for what counts as one)."""
    return [_value(m) for m in NUMBER.finditer(text)]


def final_number(text: str) -> int | float | None:
    """The last number in `text` that no negation rules out; None when there is none."""
    kept = [m for m in NUMBER.finditer(text) if not NEGATION.search(text[max(0, m.start() - 24):m.start()])]
    return _value(kept[-1]) if kept else None


def parse_reference(answer) -> int | float | str:
    """A reference answer from data (a number, or text such as "1,234" or "Paris") in comparable form."""
    if isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, (int, float)):
        return int(answer) if float(answer).is_integer() else float(answer)
    text = str(answer).strip()
    match = NUMBER.fullmatch(text)
    return _value(match) if match else text


def matches(reply: str, reference) -> bool:
    """Whether a reply states the reference answer: numbers by `final_number` (equal to 1e-9 relative),
    text answers by the reply's end (case and surrounding punctuation ignored)."""
    reference = parse_reference(reference)
    if isinstance(reference, str):
        ending = reply.strip().rstrip(".!").strip().casefold()
        return bool(reference) and ending.endswith(reference.casefold())
    stated = final_number(reply)
    return stated is not None and math.isclose(stated, reference, rel_tol=1e-9, abs_tol=1e-12)
