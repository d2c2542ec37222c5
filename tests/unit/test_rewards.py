"""Reward functions on hand-written cases: extraction, normalisation, equality, the registry."""

from __future__ import annotations

from fractions import Fraction

import pytest

from apo_ray.rewards import (
    arith_reward,
    extract_boxed,
    extract_gsm8k_answer,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    get_reward_fn,
    gsm8k_flexible_reward,
    gsm8k_reward,
    gsm8k_strict_reward,
    math_reward,
    normalize_math,
    parse_math_number,
    reward_fn_name,
)

# A user's own reward, loaded below as "<this module>:length_reward".
NOT_CALLABLE = 42


def length_reward(completion: str, answer: str) -> float:
    return 1.0 if len(completion) == len(answer) else 0.0


class Rewards:
    @staticmethod
    def always_one(completion: str, answer: str) -> float:
        return 1.0


# ---------------------------------------------------------------- gsm8k

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 72", "72"),
        ("so the total is 72", "72"),
        ("first 3 then 5 then 72.", "72"),
        ("#### 1,000", "1000"),
        ("The answer is $5.", "5"),
        ("#### $1,234.50 dollars", "1234.50"),
        ("it is -3", "-3"),
        ("x = -3.", "-3"),
        ("(-7)", "-7"),
        ("-$5", "-5"),
        ("3-4", "4"),  # a subtraction, not a negative number
        ("a-4", "4"),
        ("#### 72 #### 73", "73"),  # the last marker wins
        ("18 apples #### 20 and then 30", "20"),  # first number after the last marker
        ("#### .5", ".5"),
        ("5 then ####", None),  # a marker with nothing numeric after it
        ("no numbers here", None),
        ("", None),
        ("1e5", "5"),  # no scientific notation
        ("\u0663\u0664", None),  # non-ASCII digits are not numbers
        ("#### 72", "72"),
        (GSM8K_SOLUTION, "72"),
    ],
)
def test_extract_gsm8k_answer(text: str, expected: str | None) -> None:
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("#### 72", "72"),
        ("She sold 72 clips.", "72"),
        ("Reasoning ... #### 72", GSM8K_SOLUTION),
        ("#### 1,000", "1000"),
        ("#### 1000", "1,000"),
        ("#### $5", "5"),
        ("#### 5.0", "5"),
        ("#### 5.", "5"),
        ("#### 5.00 dollars.", "5"),
        ("#### -3", "-3"),
        ("so 0.5", ".5"),
        ("#### 18\n\nQuestion: next one has 99", "18"),
        ("The answer is 1,234,567", "1234567"),
    ],
)
def test_gsm8k_correct(completion: str, answer: str) -> None:
    assert gsm8k_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("#### 71", "72"),
        ("72 is wrong, the answer is 71", "72"),
        ("#### 72.5", "72"),
        ("#### 3", "-3"),
        ("#### -3", "3"),
        ("#### seventy-two", "72"),
        ("no answer", "72"),
        ("", "72"),
        ("72 ####", "72"),
        ("#### 7 2", "72"),
        ("#### 720", "72"),
    ],
)
def test_gsm8k_incorrect(completion: str, answer: str) -> None:
    assert gsm8k_reward(completion, answer) == 0.0


def test_gsm8k_reference_without_number_raises() -> None:
    with pytest.raises(ValueError, match="gsm8k: reference answer has no number"):
        gsm8k_reward("#### 1", "#### none")


# ---------------------------------------------------------------- gsm8k: the official code's two rewards
# verl/utils/reward_score/gsm8k.py of the A*-PO code: strict (online) = the first "#### N", flexible
# (offline V*) = the last number; both compare the extracted text with the reference as strings.


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("#### 72", "72", "72"),
        ("so the total is 72", None, "72"),  # strict needs the marker
        ("The answer is 72.", None, "72."),  # flexible keeps the sentence's full stop
        ("#### 72.", "72.", "72."),
        ("#### 1,000", "1000", "1,000"),  # strict drops commas, flexible does not
        ("#### 18 then #### 20", "18", "20"),  # strict: the FIRST marker; flexible: the last number
        ("####72", None, "72"),  # strict wants one space after the marker
        ("#### $5", None, "5"),  # "$" is not in the official character class
        ("3-4", None, "-4"),  # the official pattern reads the hyphen as a sign
        ("#### abc #### 7", "7", "7"),
        ("end with a dot .", None, None),  # "." alone is not a number
        ("no numbers", None, None),
        ("", None, None),
        (GSM8K_SOLUTION, "72", "72"),
    ],
)
def test_official_gsm8k_extractors(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_gsm8k_strict(text) == strict
    assert extract_gsm8k_flexible(text) == flexible


@pytest.mark.parametrize(
    "completion, answer, ours, strict, flexible",
    [
        ("#### 72", "72", 1.0, 1.0, 1.0),
        ("Reasoning ... #### 72", GSM8K_SOLUTION, 1.0, 1.0, 1.0),
        ("She sold 72 clips", "72", 1.0, 0.0, 1.0),
        ("She sold 72 clips.", "72", 1.0, 0.0, 1.0),  # a "." alone is skipped
        ("She sold 72.", "72", 1.0, 0.0, 0.0),  # "72." is not "72" as text
        ("#### 72.", "72", 1.0, 0.0, 0.0),
        ("#### 72.0", "72", 1.0, 0.0, 0.0),
        ("#### 1,000", "1000", 1.0, 1.0, 0.0),
        ("#### 1,000", "1,000", 1.0, 1.0, 0.0),  # the reference's commas are dropped too
        ("#### 1000", "#### 1,000", 1.0, 1.0, 1.0),
        ("#### 72 and then 73", "72", 1.0, 1.0, 0.0),
        ("#### 71 #### 72", "72", 1.0, 0.0, 1.0),  # ours and flexible read the end, strict the start
        ("#### -3", "-3", 1.0, 1.0, 1.0),
        ("#### 3", "-3", 0.0, 0.0, 0.0),
        ("", "72", 0.0, 0.0, 0.0),
    ],
)
def test_official_gsm8k_rewards_beside_ours(completion, answer, ours, strict, flexible) -> None:
    assert gsm8k_reward(completion, answer) == ours
    assert gsm8k_strict_reward(completion, answer) == strict
    assert gsm8k_flexible_reward(completion, answer) == flexible
    assert get_reward_fn("gsm8k_strict") is gsm8k_strict_reward
    assert get_reward_fn("gsm8k_flexible") is gsm8k_flexible_reward


@pytest.mark.parametrize("answer", ["#### none", "seventy-two", "", "$5", "+5"])
def test_official_gsm8k_reference_that_is_not_a_number_raises(answer: str) -> None:
    for fn in (gsm8k_strict_reward, gsm8k_flexible_reward):
        with pytest.raises(ValueError, match="gsm8k \\(official\\): reference answer is not a number"):
            fn("#### 1", answer)


# ---------------------------------------------------------------- math: extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and \\fbox{4}", "4"),
        ("$\\boxed 5$.", "5"),
        ("\\boxed {6}", "6"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{a{b{c}d}e}", "a{b{c}d}e"),
        ("\\boxed{\\boxed{9}}", "9"),
        ("\\boxed{}", ""),
        ("\\boxed{5", None),
        ("\\boxed{5} \\boxed{", None),  # the last box is unclosed
        ("\\boxed", None),
        ("\\boxedx", None),
        ("the answer is 5", None),
        ("\\boxed{" + "1" * 1001 + "}", None),
        ("\\boxed{" + "1" * 1000 + "}", "1" * 1000),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------- math: normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("\\frac{1}2", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("1/2", "\\frac{1}{2}"),
        ("-3/4", "-\\frac{3}{4}"),
        (" 5 ", "5"),
        ("5.", "5"),
        (".5", "0.5"),
        ("-.5", "-0.5"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\leftarrow", "\\leftarrow"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("$5$", "5"),
        ("50\\%", "50"),
        ("5\\text{ cm}", "5"),
        ("5 \\text{ cm}^2", "5"),
        ("5\\mbox{ inches}", "5"),
        ("\\text{(A)}", "(A)"),
        ("\\textbf{Monday}", "Monday"),
        ("x = 5", "5"),
        ("k=-2", "-2"),
        ("xyz=5", "xyz=5"),  # only a short left-hand side is dropped
        ("\\sqrt3", "\\sqrt{3}"),
        ("2\\sqrt{3}", "2\\sqrt{3}"),
        ("\\!1\\,000", "1000"),
        ("\\displaystyle\\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
        ("", ""),
    ],
)
def test_normalize_math(raw: str, expected: str) -> None:
    assert normalize_math(raw) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", Fraction(3)),
        ("-0.5", Fraction(-1, 2)),
        ("+2", Fraction(2)),
        ("1,000", Fraction(1000)),
        ("1,000.25", Fraction(4001, 4)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("\\frac{3}{-4}", Fraction(-3, 4)),
        ("-\\frac{-3}{4}", Fraction(3, 4)),
        ("0.5/2", Fraction(1, 4)),
        ("\\frac{1}{0}", None),
        ("1,2", None),  # a list, not a thousands separator
        ("1e5", None),
        ("10^{10}", None),
        ("\\sqrt{2}", None),
        ("x", None),
        ("", None),
        ("1" * 1001, None),
    ],
)
def test_parse_math_number(text: str, expected: Fraction | None) -> None:
    assert parse_math_number(text) == expected


# ---------------------------------------------------------------- math: reward

MATH_SOLUTION = "The sum is $\\frac{2}{4}$, which simplifies to $\\boxed{\\frac{1}{2}}$."


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}"),
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{.5}", "0.5"),
        ("\\boxed{\\frac{2}{4}}", "\\frac12"),  # equal as numbers
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("\\boxed{\\frac{-3}{4}}", "-\\frac{3}{4}"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{5.0}", "5"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{5\\text{ cm}}", "5"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{\\$18.90}", "18.90"),
        ("\\boxed{\\left(1, 2\\right)}", "(1,2)"),
        ("\\boxed{2\\sqrt{3}}", "2 \\sqrt 3"),
        ("\\boxed{\\text{(B)}}", "(B)"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 7$", "7"),
        ("work... \\boxed{\\frac{1}{2}}", MATH_SOLUTION),
        ("\\boxed{3} no wait \\boxed{\\frac{1}{2}}", MATH_SOLUTION),
    ],
)
def test_math_correct(completion: str, answer: str) -> None:
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
        ("the answer is 1/2", "\\frac{1}{2}"),  # not boxed
        ("\\boxed{\\frac{1}{2}} no wait \\boxed{3}", "\\frac{1}{2}"),
        ("\\boxed{}", "5"),
        ("\\boxed{5", "5"),
        ("\\boxed{(1,2)}", "(2,1)"),
        ("\\boxed{1,2}", "12"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),  # no symbolic equivalence
        ("\\boxed{1e0}", "1"),
        ("\\boxed{-5}", "5"),
        ("\\boxed{\\frac{1}{0}}", "1"),
        ("\\boxed{50}", "5"),
    ],
)
def test_math_incorrect(completion: str, answer: str) -> None:
    assert math_reward(completion, answer) == 0.0


@pytest.mark.parametrize("answer", ["", "   ", "\\boxed{", "The answer is $\\boxed{5$"])
def test_math_malformed_reference_raises(answer: str) -> None:
    with pytest.raises(ValueError, match="math: reference answer"):
        math_reward("\\boxed{5}", answer)


# ---------------------------------------------------------------- arith


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("82", "82", 1.0),
        (" 82 ", "82", 1.0),
        ("82\n", "82", 1.0),
        ("82\nanything after", "82", 1.0),
        ("82\r\n", "82", 1.0),
        ("+82", "82", 1.0),
        ("-7", "-7", 1.0),
        ("082", "82", 1.0),
        ("0", "0", 1.0),
        ("83", "82", 0.0),
        ("8 2", "82", 0.0),
        ("82.0", "82", 0.0),
        ("82=", "82", 0.0),
        ("1_000", "1000", 0.0),
        ("\u0668\u0662", "82", 0.0),  # Arabic-Indic digits: not ASCII
        ("\n82", "82", 0.0),
        ("", "82", 0.0),
        ("7", "-7", 0.0),
        ("9" * 5000, "82", 0.0),
    ],
)
def test_arith(completion: str, answer: str, expected: float) -> None:
    assert arith_reward(completion, answer) == expected


def test_arith_malformed_reference_raises() -> None:
    with pytest.raises(ValueError, match="arith: reference answer is not an integer"):
        arith_reward("82", "eighty-two")


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name, fn", [("gsm8k", gsm8k_reward), ("math", math_reward), ("arith", arith_reward)])
def test_builtins(name: str, fn: object) -> None:
    assert get_reward_fn(name) is fn
    assert get_reward_fn(f" {name} ") is fn


def test_reward_fn_name() -> None:
    assert reward_fn_name("gsm8k", None) == "gsm8k"
    assert reward_fn_name("math", None) == "math"
    assert reward_fn_name("arith", None) == "arith"
    assert reward_fn_name("gsm8k", "math") == "math"
    assert reward_fn_name("arith", " my_pkg.rewards:score ") == "my_pkg.rewards:score"
    with pytest.raises(ValueError, match="unknown task 'aime'"):
        reward_fn_name("aime", None)
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        reward_fn_name("math", "gsm8")


def test_custom_reward_fn() -> None:
    fn = get_reward_fn(f"{__name__}:length_reward")
    assert fn is length_reward
    assert fn("abc", "xyz") == 1.0
    assert get_reward_fn(f"{__name__}:Rewards.always_one")("a", "b") == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gsm8", r"unknown reward fn 'gsm8'.*gsm8k, math, arith.*did you mean 'gsm8k'\?"),
        ("MATH", r"did you mean 'math'\?"),
        ("arithmetic", r"did you mean 'arith'\?"),
        (
            "zzz",
            r"unknown reward fn 'zzz': built-in rewards are gsm8k, math, arith, gsm8k_strict, gsm8k_flexible, or give your own",
        ),
        ("", "non-empty string"),
        ("no_such_module_xyz:fn", r"reward fn 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing", rf"reward fn '{__name__}:missing': '{__name__}' has no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a callable"),
        ("module:", r"expected 'package.module:function'"),
        (":fn", r"expected 'package.module:function'"),
        ("a b:fn", r"expected 'package.module:function'"),
        ("a:b:c", r"expected 'package.module:function'"),
    ],
)
def test_get_reward_fn_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_reward_fn(spec)


def test_non_string_name_raises() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        get_reward_fn(None)  # type: ignore[arg-type]
