"""Prompt data: a task's prompts from any source, with stable ids, as a `PromptSet`.

    from apo_ray.data import load_prompts
    prompts = load_prompts(cfg.data, "train")   # or "eval"
    prompts.rows[0]  # {"prompt_id", "prompt", "answer", "question"}

Each row's `prompt` is the text fed to the model (the paper's template, no chat
template), `answer` the reference the reward compares against (gsm8k: the text after
"####"; math: the last \\boxed{} of the solution or the `answer` column; arith: the
sum), `question` the raw question. `prompt_id` is f"{task}-" + sha1(question, answer)[:16],
with "-1", "-2", ... appended to exact duplicates in order of appearance, so the same
data gets the same ids on any machine: Stage 2 joins Stage 1's V* by these ids.

Bad rows (not JSON, missing column, blank prompt, no usable answer) raise `DataError`
naming the file and line (jsonl, 1-based) or row (parquet, 0-based); with
data.on_bad_row=skip they are skipped, counted in `PromptSet.skipped` and reported in
one warning. data.max_train_prompts / max_eval_prompts keep the first K good rows
(reading stops there, so rows after them are not checked).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from apo_ray.config import DataConfig
from apo_ray.data.sources import RawRow, file_rows, hf_rows, is_hf_source, synthetic_rows
from apo_ray.data.tasks import (
    RowProblem,
    base_prompt_id,
    format_prompt,
    get_task,
    question_of,
    reference_answer,
)
from apo_ray.errors import DataError

__all__ = ["DataError", "PromptSet", "fingerprint_rows", "load_prompts", "prompt_token_counts"]

log = logging.getLogger(__name__)
SPLITS = ("train", "eval")


@dataclass
class PromptSet:
    """Prompts of one split: rows of {prompt_id, prompt, answer, question}, in source order."""

    rows: list[dict] = field(default_factory=list)
    skipped: int = 0  # bad rows skipped (data.on_bad_row=skip)
    source: str = ""  # the data source as configured
    fingerprint: str = ""  # sha256 over (prompt_id, prompt, answer) of every row, in order

    def __len__(self) -> int:
        return len(self.rows)


def fingerprint_rows(rows: list[dict]) -> str:
    """sha256 over the prompt ids, prompts and answers in order (separator bytes keep fields apart)."""
    h = hashlib.sha256()
    for row in rows:
        for key in ("prompt_id", "prompt", "answer"):
            h.update(row[key].encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


def prompt_token_counts(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Tokens of each prompt under the model's tokenizer (its default special tokens, as the engine
    counts them): the one count every stage compares with sampling.max_prompt_tokens. A longer
    prompt is dropped by Stage 1 and by Stage 2 under either algorithm, and skipped by eval."""
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []


def _split_settings(data: DataConfig, split: str) -> tuple[str, str, int | None]:
    """(source, split name for hf:, max prompts) of `split`."""
    if split not in SPLITS:
        raise ValueError(f"load_prompts: split must be one of {SPLITS}, got {split!r}")
    # data.max_*_prompts >= 1 and data.on_bad_row are checked when the config is loaded (apo_ray.config).
    if split == "train":
        return data.train_source, data.train_split, data.max_train_prompts
    return data.eval_source, data.eval_split, data.max_eval_prompts


def _raw_rows(data: DataConfig, split: str, source: str, hf_split: str) -> Iterator[RawRow]:
    if source == "synthetic":
        if data.task != "arith":
            raise DataError(f"data source 'synthetic' exists only for data.task=arith, not {data.task!r}")
        return synthetic_rows(data.arith, split)
    if is_hf_source(source):
        return hf_rows(source, hf_split)
    return file_rows(source)


def _parse(raw: RawRow, data: DataConfig, synthetic: bool) -> tuple[str, str]:
    """(question, reference answer) of a raw row; raises RowProblem."""
    if raw.row is None:
        raise RowProblem(raw.problem or "unreadable row")
    task = get_task(data.task)
    if synthetic:  # generated rows always use question/answer
        return question_of(raw.row, "question"), reference_answer(data.task, raw.row, "answer")
    question = question_of(raw.row, data.prompt_key or task.prompt_key)
    answer_key = data.answer_key or task.answer_key
    return question, reference_answer(data.task, raw.row, answer_key, key_given=data.answer_key is not None)


def load_prompts(data: DataConfig, split: str) -> PromptSet:
    """Load the prompts of `split` ("train" or "eval") as configured by `data`.

    Raises:
        DataError: missing source, a bad row (data.on_bad_row=error; the message names
            the file and line/row), or no prompts at all.
        DataError: also an hf: source without the `datasets` package.
    """
    source, hf_split, limit = _split_settings(data, split)
    rows: list[dict] = []
    seen: dict[str, int] = {}
    skipped, first_problem = 0, ""
    for raw in _raw_rows(data, split, source, hf_split):
        try:
            question, answer = _parse(raw, data, synthetic=source == "synthetic")
        except RowProblem as e:
            if data.on_bad_row == "error":
                raise DataError(f"bad prompt row at {raw.where}: {e} (data.on_bad_row=skip skips such rows)") from None
            skipped += 1
            first_problem = first_problem or f"{raw.where}: {e}"
            continue
        base = base_prompt_id(data.task, question, answer)
        copies = seen.get(base, 0)
        seen[base] = copies + 1
        prompt_id = f"{base}-{copies}" if copies else base
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": format_prompt(data.task, question),
                "answer": answer,
                "question": question,
            }
        )
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        log.warning("%s: skipped %d bad prompt rows (data.on_bad_row=skip); first: %s", source, skipped, first_problem)
    if not rows:
        extra = f" ({skipped} bad rows skipped; first: {first_problem})" if skipped else ""
        raise DataError(f"data source {source!r} ({split} split) yielded no prompts{extra}")
    return PromptSet(rows=rows, skipped=skipped, source=source, fingerprint=fingerprint_rows(rows))
