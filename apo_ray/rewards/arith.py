"""Reward of the synthetic arithmetic task (apo_ray/data/arith.py): exact integer match.

A prompt is "37+45=" and its answer "82"; the tiny model writes "82" and then EOS. The
reward is 1.0 iff the first line of the completion, stripped, is an integer (ASCII
digits, optional leading "+" or "-") equal to the answer, else 0.0. The answer must be
given in the completion's first line because that is all the tiny model is trained to
write; text after it is ignored.
"""

from __future__ import annotations

import re

# Far above any answer of the task; keeps int() clear of Python's 4300-digit limit.
MAX_DIGITS = 1000
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if len(text) > MAX_DIGITS + 1 or _INTEGER_RE.fullmatch(text) is None:
        return None
    return int(text)


def arith_reward(completion: str, answer: str) -> float:
    """1.0 iff the completion's first line is the integer `answer`, else 0.0.

    Args:
        completion: the model's output (untrusted; never raises on a str).
        answer: the reference, an integer such as "82" or "-7".

    Raises:
        ValueError: the answer is not an integer.
    """
    expected = _parse_int(answer)
    if expected is None:
        raise ValueError(f"arith: reference answer is not an integer: {answer[:200]!r}")
    got = _parse_int(completion.partition("\n")[0])
    return 1.0 if got is not None and got == expected else 0.0
