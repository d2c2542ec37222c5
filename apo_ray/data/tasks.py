"""Prompt tasks: column names, the paper's prompt templates, reference answers and prompt ids.

A task (gsm8k | math | arith) says which columns hold the question and the answer,
how the question becomes the prompt fed to the model, and which part of the answer
column the reward compares against:

- gsm8k: columns question/answer. Prompt = question + the paper's GSM8K suffix. The
  reference answer is the text after the last "####" (stripped); a bare number with
  no "####" (a file that already holds final answers) is accepted as is.
- math: columns problem/solution. Prompt = problem + the paper's MATH suffix. The
  reference answer is the file's `answer` column when it has one (MATH-500 does),
  else the content of the last \\boxed{} of the solution (braces matched).
- arith: columns question/answer, prompt = the question as is ("37+45=").

Templates are the paper's (base models, no chat template), appended with one space.
Prompt ids hash the question and the reference answer, so the same data gets the
same ids on any machine.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

GSM8K_SUFFIX = ' Let\'s think step by step and output the final answer after "####".'
MATH_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."

_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+")


class RowProblem(ValueError):
    """A row that cannot be used; the message says why (the caller adds where)."""


@dataclass(frozen=True)
class Task:
    name: str
    prompt_key: str  # default question column
    answer_key: str  # default answer column
    suffix: str  # appended to the question to make the prompt


TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "question", "answer", GSM8K_SUFFIX),
    "math": Task("math", "problem", "solution", MATH_SUFFIX),
    "arith": Task("arith", "question", "answer", ""),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown data.task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def format_prompt(task: str, question: str) -> str:
    """The text fed to the model: the question with the task's template applied."""
    return question + get_task(task).suffix


def gsm8k_answer(text: str) -> Optional[str]:
    """The text after the last "####" (stripped), or a bare number; None if no number is found."""
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip()
        return answer if re.search(r"\d", answer) else None
    answer = text.strip()
    return answer if _NUMBER.fullmatch(answer) else None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} of a MATH solution (the reward module's extractor,
    so references and completions are read the same way); None if there is none or it does not close."""
    from apo_ray.rewards import extract_boxed

    return extract_boxed(text)


def as_text(value: Any, what: str) -> str:
    """A cell as a string: numbers are accepted (72.0 -> "72"), nulls and containers are not."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowProblem(f"{what} is null")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise RowProblem(f"{what} is a boolean, not text")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    raise RowProblem(f"{what} is a {type(value).__name__}, not text")


def _column(row: dict, key: str, kind: str) -> Any:
    if key not in row:
        raise RowProblem(f"missing {kind} column {key!r} (row has: {', '.join(map(str, row)) or 'no columns'})")
    return row[key]


def _filled(value: Any) -> bool:
    try:
        return bool(as_text(value, "answer").strip())
    except RowProblem:
        return False


def _math_answer(row: dict, answer_key: str, key_given: bool) -> str:
    """An explicit data.answer_key or an `answer` column wins; else the solution's last \\boxed{}."""
    if not key_given and _filled(row.get("answer")):
        key_given, answer_key = True, "answer"
    if not key_given and answer_key not in row:
        raise RowProblem(f"missing answer column {answer_key!r} and no 'answer' column (row has: {', '.join(row)})")
    text = as_text(_column(row, answer_key, "answer"), f"answer column {answer_key!r}")
    boxed = last_boxed(text)
    if boxed is None and not key_given:
        raise RowProblem(f"no \\boxed{{...}} final answer in column {answer_key!r} (and no 'answer' column)")
    return (boxed if boxed is not None else text).strip()


def reference_answer(task: str, row: dict, answer_key: str, key_given: bool = False) -> str:
    """The answer the reward compares against, from one row.

    Args:
        task: gsm8k | math | arith.
        row: the raw row.
        answer_key: the answer column.
        key_given: True when the user set data.answer_key (math: its value is used as is
            when it holds no \\boxed{}).

    Raises:
        RowProblem: missing column, null or empty answer, no extractable final answer.
    """
    if task == "math":
        answer = _math_answer(row, answer_key, key_given)
    else:
        answer = as_text(_column(row, answer_key, "answer"), f"answer column {answer_key!r}").strip()
        if answer and task == "gsm8k":
            extracted = gsm8k_answer(answer)
            if extracted is None:
                raise RowProblem(f"no final number after '####' in answer column {answer_key!r}")
            answer = extracted
    if not answer:
        raise RowProblem(f"empty answer in column {answer_key!r}")
    return answer


def question_of(row: dict, prompt_key: str) -> str:
    """The raw question of a row (unchanged); raises RowProblem if missing, not text or blank."""
    value = _column(row, prompt_key, "prompt")
    if not isinstance(value, str):
        if value is None:
            raise RowProblem(f"prompt column {prompt_key!r} is null")
        raise RowProblem(f"prompt column {prompt_key!r} is a {type(value).__name__}, not text")
    if not value.strip():
        raise RowProblem(f"empty prompt in column {prompt_key!r}")
    return value


def base_prompt_id(task: str, question: str, answer: str) -> str:
    """f"{task}-" + the first 16 hex digits of sha1(question + "\\x1f" + answer)."""
    digest = hashlib.sha1(f"{question}\x1f{answer}".encode()).hexdigest()
    return f"{task}-{digest[:16]}"
