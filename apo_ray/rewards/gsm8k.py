"""GSM8K rewards: ours (`gsm8k_reward`) and the official code's two (`gsm8k_strict_reward`,
`gsm8k_flexible_reward`).

Ours, "gsm8k": 1.0 iff the completion's final number equals the reference number. The final number of a completion is the first number after its last "####" (the
format the GSM8K prompt template asks for), or, when there is no "####", the last
number in the text. Numbers compare exactly as rationals (`fractions.Fraction`), so
"1,000", "$1000", "1000.0" and "1000." all equal "1000".

The completion is untrusted model output: everything here is a linear scan with no
nested regex quantifiers, and a number longer than `MAX_ANSWER_CHARS` is rejected
before it is converted (Python refuses int() of > 4300 digits, and huge numbers are
slow). Scientific notation is not read: "1e999999999" is the numbers 1 and 999999999.

The official A*-PO code (verl/utils/reward_score/gsm8k.py of github.com/ZhaolinGao/A-PO) has two
extractors and compares the extracted text with the reference as strings:

- "gsm8k_strict" (its online reward, Stage 2 and validation): the first "#### N" in the text, N
  the characters of `-?[0-9.,]+` right after "#### " (one space), commas removed; no such match
  scores 0. So "#### 72." and "#### 72.0" score 0 against "72", and "The answer is 72" scores 0.
- "gsm8k_flexible" (its offline V*, Stage 1): the last run of `-?[0-9.,]+` in the text that is not
  ".", compared as is (commas and a trailing "." kept): "72" scores 1, "72." and "1,000" do not.

The reference is read as the official data preprocessing writes it: the first "#### N" of a full
solution, commas removed, or a bare number ("72", "1,000" -> "1000"). One difference: the official
online reward reads prompt + completion, ours the completion only (the paper's GSM8K prompt holds
no "#### N", so the score is the same).
"""

from __future__ import annotations

import re
from collections import deque
from fractions import Fraction
from functools import lru_cache

MAX_ANSWER_CHARS = 1000

# An optional minus, an optional "$", then digits with thousands commas and an optional
# decimal part (".5" too). No nested quantifiers: linear on any input.
_NUMBER_RE = re.compile(r"(-)?\$?([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)")
# A "-" right after one of these is a hyphen or a subtraction ("3-4", "x-2"), not a sign.
_NOT_A_SIGN_BEFORE = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ)]}")


def _number_text(text: str, match: re.Match[str]) -> str | None:
    """The canonical text of a number match ("-1000.5"), or None when it is too long."""
    if match.end() - match.start() > MAX_ANSWER_CHARS:
        return None
    digits = match.group(2).replace(",", "")
    start = match.start()
    negative = match.group(1) is not None and (start == 0 or text[start - 1] not in _NOT_A_SIGN_BEFORE)
    return "-" + digits if negative else digits


def _first_number(text: str) -> str | None:
    match = _NUMBER_RE.search(text)
    return None if match is None else _number_text(text, match)


def _last_number(text: str) -> str | None:
    last = deque(_NUMBER_RE.finditer(text), maxlen=1)
    return _number_text(text, last[0]) if last else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K completion or solution, as canonical text.

    Args:
        text: a completion, or a reference solution ending "#### 72".

    Returns:
        The first number after the last "####" if there is one (None when nothing numeric
        follows it), else the last number in the text; commas and "$" removed, a leading
        "-" kept unless it follows a letter, digit or bracket ("1,000" -> "1000", "-$5" -> "-5",
        "3-4" -> "4"). None if there is no number or it is longer than MAX_ANSWER_CHARS.
    """
    marker = text.rfind("####")
    if marker >= 0:
        return _first_number(text[marker + 4 :])
    return _last_number(text)


@lru_cache(maxsize=65536)
def _reference_value(answer: str) -> Fraction:
    """The reference number of a GSM8K answer (cached: each reference is scored N times)."""
    number = extract_gsm8k_answer(answer)
    if number is None:
        raise ValueError(f"gsm8k: reference answer has no number: {answer[:200]!r}")
    return Fraction(number)


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 iff the completion's final number equals the reference's number, else 0.0.

    Args:
        completion: the model's output (untrusted; never raises on a str).
        answer: a bare number ("72", "1,000", "-3") or a full GSM8K solution ending "#### 72".

    Raises:
        ValueError: the reference answer contains no number.
    """
    expected = _reference_value(answer)
    got = extract_gsm8k_answer(completion)
    if got is None:
        return 0.0
    return 1.0 if Fraction(got) == expected else 0.0


# ---------------------------------------------------------------- the official code's two rewards

_OFFICIAL_STRICT_RE = re.compile(r"#### (-?[0-9.,]+)")
_OFFICIAL_NUMBER_RE = re.compile(r"-?[0-9.,]+")


def extract_gsm8k_strict(text: str) -> str | None:
    """The official strict extraction: the first "#### N" (N of `-?[0-9.,]+`), commas removed; else None."""
    match = _OFFICIAL_STRICT_RE.search(text)
    return None if match is None else match.group(1).replace(",", "")


def extract_gsm8k_flexible(text: str) -> str | None:
    """The official flexible extraction: the last run of `-?[0-9.,]+` that is not ".", as written; else None."""
    last = None
    for match in _OFFICIAL_NUMBER_RE.finditer(text):
        if match.group() != ".":
            last = match
    return None if last is None else last.group()


@lru_cache(maxsize=65536)
def _official_reference(answer: str) -> str:
    """The reference as the official GSM8K preprocessing writes it (cached: scored N times)."""
    text = answer.strip()
    ref = extract_gsm8k_strict(text) if "####" in text else text.replace(",", "")
    if ref is None or _OFFICIAL_NUMBER_RE.fullmatch(ref) is None or not any(c.isdigit() for c in ref):
        raise ValueError(f"gsm8k (official): reference answer is not a number or '... #### N': {answer[:200]!r}")
    return ref


def gsm8k_strict_reward(completion: str, answer: str) -> float:
    """The official online reward: 1.0 iff the first "#### N" of the completion is the reference, as text.

    Args:
        completion: the model's output (untrusted; never raises on a str).
        answer: a bare number ("72", "1,000") or a full GSM8K solution ending "#### 72".

    Raises:
        ValueError: the reference is not a number.
    """
    expected = _official_reference(answer)
    return 1.0 if extract_gsm8k_strict(completion) == expected else 0.0


def gsm8k_flexible_reward(completion: str, answer: str) -> float:
    """The official offline (V*) reward: 1.0 iff the completion's last number, as written, is the reference.

    Args:
        completion: the model's output (untrusted; never raises on a str).
        answer: a bare number ("72", "1,000") or a full GSM8K solution ending "#### 72".

    Raises:
        ValueError: the reference is not a number.
    """
    expected = _official_reference(answer)
    return 1.0 if extract_gsm8k_flexible(completion) == expected else 0.0
