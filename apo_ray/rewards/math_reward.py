"""MATH reward: 1.0 iff the completion's last \\boxed{...} matches the reference answer.

Both answers are normalised in the spirit of the Hendrycks MATH `strip_string` (our own
implementation: spaces, \\left/\\right, degrees, "\\$", units written with \\text{...},
\\dfrac/\\tfrac, \\frac12 -> \\frac{1}{2}, ".5" -> "0.5", "a/b" -> \\frac{a}{b}, a
short "x=" prefix, a trailing "."), then compared as strings; if both are plain numbers
or fractions (\\frac{1}{2}, 1/2, 0.5, -\\frac{3}{4}, 1,000) they also compare exactly as
rationals. There is no symbolic equivalence (no sympy): "2\\sqrt{2}" and "\\sqrt{8}" differ.

The completion is untrusted model output: braces are matched by one linear scan, an
answer longer than `MAX_ANSWER_CHARS` is rejected, numbers are only converted when they
are short, and scientific notation is never evaluated, so no input is slow.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

MAX_ANSWER_CHARS = 1000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_SPACES_RE = re.compile(r"[ \t]*")
_BARE_BOX_RE = re.compile(r"[^$\n]*")
# Removed outright (spacing, sizing, math-mode dollars, degrees, percent).
_DROP = (
    "\\displaystyle",
    "\\qquad",
    "\\quad",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "^{\\circ}",
    "^\\circ",
    "\N{DEGREE SIGN}",
    "\\$",
    "$",
    "\\%",
    "%",
)
# \left( -> (, but \leftarrow stays.
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textrm", "\\mbox", "\\mathrm")
# A trailing unit power after \text{...}: "5\text{cm}^2".
_UNIT_POWER_RE = re.compile(r"\^(?:[0-9]|\{[0-9]\})")
# "." starting a number: ".5" -> "0.5", "-.5" -> "-0.5".
_BARE_POINT_RE = re.compile(r"(?<![0-9])\.(?=[0-9])")
_SLASH_FRACTION_RE = re.compile(r"(-?)([0-9]+)/([0-9]+)")
_DECIMAL = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+"
_NUMBER_RE = re.compile(rf"([-+]?)({_DECIMAL})")
_FRAC_NUMBER_RE = re.compile(rf"([-+]?)\\frac\{{([-+]?)({_DECIMAL})\}}\{{([-+]?)({_DECIMAL})\}}")
_SLASH_NUMBER_RE = re.compile(rf"([-+]?)({_DECIMAL})/({_DECIMAL})")


# ---------------------------------------------------------------- extraction


def _group_end(text: str, open_at: int, limit: int) -> int | None:
    """Index of the "}" closing the "{" at `open_at`, or None (unbalanced, or longer than `limit`).

    A backslash escapes the next character, so "\\{" and "\\}" are literal braces.
    """
    depth = 0
    i = open_at
    stop = min(len(text), open_at + limit + 2)
    while i < stop:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} in `text` (or "\\boxed 5"), else None.

    Args:
        text: a completion or a MATH solution.
        max_chars: a content longer than this is rejected (None).

    Returns:
        The content with nested braces matched ("\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"),
        or None when there is no box, its braces never close, or it is too long.
    """
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    after = start + len(command)
    i = _SPACES_RE.match(text, after).end()
    if i < len(text) and text[i] == "{":
        end = _group_end(text, i, max_chars)
        return None if end is None else text[i + 1 : end]
    if i > after:
        # "\boxed 5": up to the closing "$" or the end of the line.
        answer = _BARE_BOX_RE.match(text, i, i + max_chars + 1).group().strip()
        return answer if answer and len(answer) <= max_chars else None
    return None


# ---------------------------------------------------------------- normalisation


def _strip_unit(s: str) -> str:
    """Drop a trailing "\\text{unit}" (and a unit power) after a non-empty value: "5\\text{cm}^2" -> "5"."""
    power = _UNIT_POWER_RE.search(s, max(0, len(s) - 4))
    body = s[: power.start()] if power and power.end() == len(s) else s
    for command in _TEXT_COMMANDS:
        at = body.rfind(command + "{")
        if at > 0 and _group_end(body, at + len(command), len(body)) == len(body) - 1:
            return body[:at]
    return s


def _unwrap_text(s: str) -> str:
    """\\text{X} -> X for the commands in _TEXT_COMMANDS (one linear pass per command)."""
    for command in _TEXT_COMMANDS:
        opener = command + "{"
        out: list[str] = []
        i = 0
        while (at := s.find(opener, i)) >= 0:
            end = _group_end(s, at + len(command), len(s))
            if end is None:
                break
            out.append(s[i:at])
            out.append(s[at + len(opener) : end])
            i = end + 1
        out.append(s[i:])
        s = "".join(out)
    return s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3} (a single-character argument)."""
    head, *pieces = s.split("\\sqrt")
    out = [head]
    for piece in pieces:
        if piece and piece[0] not in "{[\\":
            piece = "{" + piece[0] + "}" + piece[1:]
        out.append("\\sqrt" + piece)
    return "".join(out)


def _braced_argument(piece: str, at: int) -> tuple[str, int] | None:
    """The argument starting at `at` as ("{...}", end); a bare character is wrapped. None if absent."""
    if at >= len(piece):
        return None
    if piece[at] == "{":
        end = _group_end(piece, at, len(piece))
        return None if end is None else (piece[at : end + 1], end + 1)
    if piece[at] == "\\":
        return None  # a command argument (\frac\pi2): leave as written
    return "{" + piece[at] + "}", at + 1


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\frac{1}2 -> \\frac{1}{2}.

    Splitting on "\\frac" keeps this linear; an argument that runs into the next
    "\\frac" (nested fractions) is left as written, the same on both sides.
    """
    head, *pieces = s.split("\\frac")
    out = [head]
    for piece in pieces:
        first = _braced_argument(piece, 0)
        second = None if first is None else _braced_argument(piece, first[1])
        if first is not None and second is not None:
            piece = first[0] + second[0] + piece[second[1] :]
        out.append("\\frac" + piece)
    return "".join(out)


def _drop_short_lhs(s: str) -> str:
    """ "x=5" -> "5", "k=-2" -> "-2": drop a left-hand side of at most 2 characters."""
    lhs, sep, rhs = s.partition("=")
    if sep and "=" not in rhs and 0 < len(lhs) <= 2:
        return rhs
    return s


def normalize_math(s: str) -> str:
    """Canonical text of a MATH answer, for string comparison.

    Args:
        s: an answer, e.g. the content of a \\boxed{...}: "\\dfrac12", "x = 5\\text{ cm}".

    Returns:
        The normalised text: "\\frac{1}{2}", "5".
    """
    s = s.replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = "".join(s.split()).rstrip(".")
    s = _unwrap_text(_strip_unit(s))
    s = _drop_short_lhs(s)
    s = _fix_fracs(_fix_sqrt(s))
    s = _BARE_POINT_RE.sub("0.", s)
    slash = _SLASH_FRACTION_RE.fullmatch(s)
    if slash is not None:
        s = f"{slash.group(1)}\\frac{{{slash.group(2)}}}{{{slash.group(3)}}}"
    return s.rstrip(".")


# ---------------------------------------------------------------- numeric comparison


def _decimal(sign: str, digits: str) -> Fraction:
    value = Fraction(digits.replace(",", "").rstrip("."))
    return -value if sign == "-" else value


def parse_math_number(s: str) -> Fraction | None:
    """The exact value of a normalised plain number or fraction, else None.

    Reads "3", "-0.5", "1,000", "\\frac{1}{2}", "-\\frac{3}{4}", "\\frac{-3}{4}", "3/4";
    anything else (letters, exponents, radicals, tuples) is None, as is a zero denominator.
    """
    if len(s) > MAX_ANSWER_CHARS:
        return None
    if m := _NUMBER_RE.fullmatch(s):
        return _decimal(m.group(1), m.group(2))
    if m := _FRAC_NUMBER_RE.fullmatch(s):
        num, den = _decimal(m.group(2), m.group(3)), _decimal(m.group(4), m.group(5))
    elif m := _SLASH_NUMBER_RE.fullmatch(s):
        num, den = _decimal("", m.group(2)), _decimal("", m.group(3))
    else:
        return None
    if den == 0:
        return None
    return -num / den if m.group(1) == "-" else num / den


@lru_cache(maxsize=65536)
def _reference(answer: str) -> tuple[str, Fraction | None]:
    """The normalised reference and its value (cached: each reference is scored N times)."""
    boxed = extract_boxed(answer)
    if boxed is None and any(c in answer for c in _BOX_COMMANDS):
        raise ValueError(f"math: reference answer has an unclosed or over-long \\boxed: {answer[:200]!r}")
    norm = normalize_math(answer if boxed is None else boxed)
    if not norm:
        raise ValueError(f"math: reference answer is empty after normalisation: {answer[:200]!r}")
    return norm, parse_math_number(norm)


def math_reward(completion: str, answer: str) -> float:
    """1.0 iff the last \\boxed{...} of the completion equals the reference answer, else 0.0.

    Args:
        completion: the model's output (untrusted; never raises on a str).
        answer: a bare answer ("\\frac{1}{2}") or a full MATH solution (its last \\boxed is used).

    Raises:
        ValueError: the reference answer is empty or has an unclosed \\boxed.
    """
    ref_norm, ref_value = _reference(answer)
    boxed = extract_boxed(completion)
    if boxed is None:
        return 0.0
    norm = normalize_math(boxed)
    if not norm:
        return 0.0
    if norm == ref_norm:
        return 1.0
    if ref_value is None:
        return 0.0
    value = parse_math_number(norm)
    return 1.0 if value is not None and value == ref_value else 0.0
