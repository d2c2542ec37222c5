"""Reward functions on hostile completions: every call returns 0.0 or 1.0, never raises, in < 0.5 s.

Completions are untrusted model output of up to 100,000 characters. These inputs aim at
the usual ways a checker goes wrong: deep nesting, unbalanced braces, huge numbers and
exponents (int() of > 4300 digits raises in Python 3.11), regex backtracking, many
markers, NUL bytes and unicode.
"""

from __future__ import annotations

import random
import time

import pytest

from apo_ray.rewards import (
    extract_boxed,
    extract_gsm8k_answer,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    get_reward_fn,
    normalize_math,
    parse_math_number,
)

MAX_CHARS = 100_000
TIME_LIMIT_S = 0.5


def _fill(unit: str, prefix: str = "", suffix: str = "") -> str:
    """`unit` repeated to fill MAX_CHARS with the prefix and suffix."""
    room = MAX_CHARS - len(prefix) - len(suffix)
    return prefix + unit * (room // len(unit)) + suffix


def _random_text(seed: int, alphabet: str) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(MAX_CHARS))


HOSTILE = {
    "boxed_open_nest": _fill("\\boxed{"),
    "fbox_open_nest": _fill("\\fbox{"),
    "open_braces": _fill("{", "\\boxed"),
    "close_braces": _fill("}", "\\boxed{"),
    "balanced_deep_nest": "\\boxed" + "{" * 49_000 + "}" * 49_000,
    "nest_within_cap": "\\boxed{" + "{" * 490 + "}" * 490 + "}",
    "brace_pairs_in_box": "\\boxed{" + "{}" * 499 + "}",
    "backslashes": _fill("\\"),
    "boxed_backslashes": _fill("\\", "\\boxed{", "}"),
    "escaped_braces": _fill("\\{", "\\boxed{"),
    "boxed_many_spaces": _fill(" ", "\\boxed", "{5}"),
    "boxed_bare_long": _fill("5", "\\boxed "),
    "many_boxes": _fill("\\boxed{1}"),
    "many_frac_in_box": "\\boxed{" + "\\frac" * 199 + "}",
    "frac12_in_box": "\\boxed{" + "\\frac12" * 142 + "}",
    "many_frac": _fill("\\frac"),
    "many_sqrt": _fill("\\sqrt", "\\boxed{", "}"),
    "text_nest_in_box": "\\boxed{" + "\\text{" * 100 + "}" * 100 + "}",
    "text_units": _fill("\\text{cm}", "\\boxed{5"),
    "left_right": "\\boxed{" + "\\left(" * 100 + "\\right)" * 50 + "}",
    "equals_in_box": "\\boxed{" + "x=" * 499 + "}",
    "power_tower": "\\boxed{10^{10^{10^{10}}}}",
    "python_power": "10**10**10",
    "boxed_python_power": "\\boxed{9**9**9**9}",
    "huge_exponent": "1e999999999",
    "boxed_huge_exponent": "\\boxed{1e999999999}",
    "gsm8k_huge_exponent": "#### 1e999999999",
    "thousand_digit_number": "\\boxed{" + "7" * 1000 + "}",
    "thousand_digit_fraction": "\\boxed{" + "7" * 499 + "/" + "3" * 499 + "}",
    "thousand_digit_decimal": "\\boxed{0." + "9" * 990 + "}",
    "frac_long_parts": "\\boxed{\\frac{" + "9" * 490 + "}{" + "1" * 490 + "}}",
    "digits": _fill("9"),
    "digits_after_marker": _fill("9", "#### "),
    "digits_5000": "9" * 5000,
    "digits_then_answer": _fill("9", "", " #### 72"),
    "long_negative": _fill("0", "-1"),
    "commas": _fill("1,"),
    "points": _fill("1."),
    "dots": _fill("."),
    "dollars": _fill("$"),
    "minus": _fill("-"),
    "plus": _fill("+"),
    "slashes": _fill("1/"),
    "parens": _fill("("),
    "many_markers": _fill("####"),
    "markers_and_numbers": _fill("#### 1 "),
    "many_small_numbers": _fill("1 "),
    "newlines": _fill("\n"),
    "lines_of_answers": _fill("82\n"),
    "nul_bytes": _fill("\x00"),
    "nul_in_box": _fill("\x00", "\\boxed{", "}"),
    "arabic_digits": _fill("\u0663"),
    "emoji": _fill("\U0001f600"),
    "combining_marks": _fill("5\u0301"),
    "rtl_and_minus": _fill("\u202e\u2212"),
    "surrogate_escapes": _fill("\udcff"),
    "random_latex": _random_text(0, "\\{}$#^_ 0123456789.,-/boxedfractl"),
    "random_printable": _random_text(1, "".join(chr(c) for c in range(32, 127))),
    "random_unicode": _random_text(2, "".join(chr(c) for c in range(0, 0x3000, 7))),
    "empty": "",
}

REFERENCES = {
    "gsm8k": ["72", "#### 1,000"],
    "gsm8k_strict": ["72", "#### 1,000"],
    "gsm8k_flexible": ["72", "#### 1,000"],
    "math": ["\\frac{1}{2}", "$\\boxed{5}$"],
    "arith": ["82", "-7"],
}
CASES = [(task, ref) for task, refs in REFERENCES.items() for ref in refs]


def test_hostile_inputs_fit_the_bound() -> None:
    assert all(len(text) <= MAX_CHARS for text in HOSTILE.values())


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("task, answer", CASES)
def test_reward_on_hostile_completion(task: str, answer: str, name: str) -> None:
    fn = get_reward_fn(task)
    fn("warm-up", answer)  # the reference is parsed (and cached) outside the timed call
    completion = HOSTILE[name]
    start = time.perf_counter()
    reward = fn(completion, answer)
    elapsed = time.perf_counter() - start
    assert reward in (0.0, 1.0)
    assert elapsed < TIME_LIMIT_S, f"{task} on {name}: {elapsed:.3f} s"


@pytest.mark.parametrize("name", list(HOSTILE))
def test_helpers_on_hostile_text(name: str) -> None:
    text = HOSTILE[name]
    start = time.perf_counter()
    extract_gsm8k_answer(text)
    extract_gsm8k_strict(text)
    extract_gsm8k_flexible(text)
    boxed = extract_boxed(text)
    normalize_math(text)
    parse_math_number(text)
    if boxed is not None:
        parse_math_number(normalize_math(boxed))
    assert time.perf_counter() - start < TIME_LIMIT_S


def test_answer_still_found_after_hostile_prefix() -> None:
    assert get_reward_fn("gsm8k")(HOSTILE["digits_then_answer"], "72") == 1.0
    assert get_reward_fn("gsm8k_strict")(HOSTILE["digits_then_answer"], "72") == 1.0
    assert get_reward_fn("gsm8k_flexible")(HOSTILE["digits_then_answer"], "72") == 1.0
    assert get_reward_fn("math")("\\boxed{" * 1000 + "\\boxed{\\frac12}", "0.5") == 1.0
    assert get_reward_fn("math")("\\boxed{5}" + "}" * 50_000, "5") == 1.0
    assert get_reward_fn("arith")("82\n" + "\\boxed{" * 10_000, "82") == 1.0
