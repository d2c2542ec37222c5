"""Where prompt rows come from, as raw dicts tagged with their location.

Sources (the value of data.train_source / data.eval_source):

- ``synthetic``: the arith task's generated problems (`apo_ray.data.arith`).
- a local ``.jsonl`` or ``.parquet`` file, or a directory of them (read in name order;
  names starting with "." or "_" are ignored).
- a URI of the same (``s3://``, ``gs://``, ``file://``, ...), opened with
  `pyarrow.fs.FileSystem.from_uri`, so every node of a cluster can read it.
- ``hf:NAME`` or ``hf:NAME:SUBSET``: a Hugging Face dataset split, via
  `datasets.load_dataset` (optional dependency, imported only here).

Every row carries `where` ("train.jsonl line 3", "x.parquet row 0"), so a bad row can
be reported with its file and position. Rows that cannot even be parsed (a line that
is not JSON) come back with `problem` set instead of `row`; the caller decides whether
that stops the job.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from apo_ray.config import ArithConfig
from apo_ray.data.arith import arith_problems
from apo_ray.errors import DataError
from apo_ray.storage import get_fs

FILE_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class RawRow:
    where: str  # file and position, for messages
    row: Optional[dict]  # None when the row could not be parsed
    problem: Optional[str] = None  # why it could not be parsed


# ---------------------------------------------------------------- synthetic


def synthetic_rows(arith: ArithConfig, split: str) -> Iterator[RawRow]:
    """The arith problems of `split` ("train" or "eval"): data.arith.num_train or num_eval of them."""
    is_eval = split == "eval"
    num = arith.num_eval if is_eval else arith.num_train
    try:
        problems = arith_problems(
            "eval" if is_eval else "train", num, seed=arith.seed, digits=arith.digits, ops=arith.ops
        )
    except ValueError as e:
        raise DataError(f"data.arith: {e}") from e
    for i, problem in enumerate(problems):
        yield RawRow(f"synthetic {split} row {i}", problem)


# ---------------------------------------------------------------- Hugging Face


def is_hf_source(source: str) -> bool:
    return source.startswith("hf:") and not source.startswith("hf://")


def parse_hf_source(source: str) -> tuple[str, Optional[str]]:
    """``hf:NAME`` -> (NAME, None); ``hf:NAME:SUBSET`` -> (NAME, SUBSET)."""
    name, _, subset = source[len("hf:") :].partition(":")
    if not name:
        raise DataError(f"data source {source!r}: expected hf:NAME or hf:NAME:SUBSET")
    return name, subset or None


def _hf_loader() -> Callable[..., Any]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            "an 'hf:' data source needs the Hugging Face `datasets` package: pip install datasets "
            "(it comes with apo-ray's [hf] and [gpu] extras), or point data.train_source / data.eval_source "
            "at a local .jsonl or .parquet file"
        ) from None
    return load_dataset


def hf_rows(source: str, split: str) -> Iterator[RawRow]:
    """Rows of split `split` of the Hugging Face dataset named by ``hf:NAME[:SUBSET]``."""
    name, subset = parse_hf_source(source)
    load_dataset = _hf_loader()
    args = (name, subset) if subset else (name,)
    try:
        dataset = load_dataset(*args, split=split)
    except Exception as e:  # hub, network and cache errors come in many types
        raise DataError(f"data source {source!r}: could not load split {split!r} ({type(e).__name__}: {e})") from e
    for i, row in enumerate(dataset):
        yield RawRow(f"{source} split {split} row {i}", dict(row))


# ---------------------------------------------------------------- files


def _filesystem(source: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path) for a local path or a URI; DataError naming the source if it cannot open."""
    try:
        return get_fs(source)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"data source {source!r}: cannot open ({e})") from e


def _list_files(fs: Any, path: str, source: str) -> list[tuple[str, str]]:
    """[(name for messages, path in fs)] of the .jsonl/.parquet files that `source` names."""
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data source {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        files = sorted(
            (e for e in entries if e.type == pafs.FileType.File and _is_data_file(e.base_name)),
            key=lambda e: e.base_name,
        )
        if not files:
            raise DataError(f"data source {source!r}: directory holds no {' or '.join(FILE_SUFFIXES)} files")
        return [(f"{source.rstrip('/')}/{e.base_name}", e.path) for e in files]
    if not path.lower().endswith(FILE_SUFFIXES):
        raise DataError(f"data source {source!r}: unsupported file type (use {' or '.join(FILE_SUFFIXES)})")
    return [(source, path)]


def _is_data_file(name: str) -> bool:
    return name.lower().endswith(FILE_SUFFIXES) and not name.startswith((".", "_"))


def _jsonl_row(line: bytes, where: str) -> RawRow:
    try:
        row = json.loads(line)
    except UnicodeDecodeError:
        return RawRow(where, None, "not valid UTF-8")
    except json.JSONDecodeError as e:
        return RawRow(where, None, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        return RawRow(where, None, f"not a JSON object (got {type(row).__name__})")
    return RawRow(where, row)


def _jsonl_rows(fs: Any, path: str, name: str) -> Iterator[RawRow]:
    """One row per non-blank line; `where` has the 1-based line number."""
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e})") from e
    data = data.removeprefix(codecs.BOM_UTF8)
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield _jsonl_row(line, f"{name} line {number}")


def _parquet_rows(fs: Any, path: str, name: str) -> Iterator[RawRow]:
    """One row per table row; `where` has the 0-based row index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name}: not a readable parquet file ({e})") from e
        index = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield RawRow(f"{name} row {index}", row)
                index += 1


def file_rows(source: str) -> Iterator[RawRow]:
    """Rows of a .jsonl/.parquet file, or of every such file of a directory in name order."""
    fs, path = _filesystem(source)
    for name, file_path in _list_files(fs, path, source):
        if file_path.lower().endswith(".jsonl"):
            yield from _jsonl_rows(fs, file_path, name)
        else:
            yield from _parquet_rows(fs, file_path, name)
