"""Prompt data: sources, templates, reference answers, ids, bad rows and limits (tmp files only)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apo_ray.config import ArithConfig, DataConfig
from apo_ray.data import DataError, PromptSet, load_prompts
from apo_ray.data.tasks import format_prompt, gsm8k_answer, last_boxed

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 12 eggs. How many in 6 boxes?", "answer": "12 * 6 = 72\n#### 72"},
    {"question": "Sam earns $1,000 a week. How much in 2 weeks?", "answer": "#### 2,000"},
]
MATH_ROWS = [
    {"problem": "What is $1/2 + 0$?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Find $x$ if $x+1=3$.", "solution": "First \\boxed{1}, no wait: $x = \\boxed{2}$."},
]
ARITH_ROWS = [{"question": "37+45=", "answer": "82"}, {"question": "1+1=", "answer": "2"}]


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(task: str, train: str | Path = "synthetic", eval_: str | Path = "synthetic", **kw) -> DataConfig:
    return DataConfig(task=task, train_source=str(train), eval_source=str(eval_), **kw)


def check_rows(ps: PromptSet) -> None:
    for r in ps.rows:
        assert set(r) == {"prompt_id", "prompt", "answer", "question"}
        assert all(isinstance(v, str) for v in r.values())


# ---------------------------------------------------------------- round trips and templates


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_gsm8k_round_trip(tmp_path: Path, fmt: str) -> None:
    write = write_jsonl if fmt == "jsonl" else write_parquet
    path = write(tmp_path / f"gsm8k.{fmt}", GSM8K_ROWS)
    ps = load_prompts(cfg("gsm8k", path), "train")
    check_rows(ps)
    assert len(ps) == 3 and ps.skipped == 0 and ps.source == str(path)
    assert [r["answer"] for r in ps.rows] == ["7", "72", "2,000"]
    assert [r["question"] for r in ps.rows] == [r["question"] for r in GSM8K_ROWS]
    q = GSM8K_ROWS[1]["question"]
    assert ps.rows[1]["prompt"] == q + ' Let\'s think step by step and output the final answer after "####".'


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_math_round_trip(tmp_path: Path, fmt: str) -> None:
    write = write_jsonl if fmt == "jsonl" else write_parquet
    ps = load_prompts(cfg("math", write(tmp_path / f"math.{fmt}", MATH_ROWS)), "train")
    check_rows(ps)
    assert [r["answer"] for r in ps.rows] == ["\\frac{1}{2}", "2"]  # the LAST box, nested braces kept
    assert ps.rows[0]["prompt"] == (
        "What is $1/2 + 0$? Let's think step by step and output the final answer within \\boxed{}."
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_arith_round_trip(tmp_path: Path, fmt: str) -> None:
    write = write_jsonl if fmt == "jsonl" else write_parquet
    ps = load_prompts(cfg("arith", write(tmp_path / f"arith.{fmt}", ARITH_ROWS)), "train")
    check_rows(ps)
    assert [(r["prompt"], r["question"], r["answer"]) for r in ps.rows] == [
        ("37+45=", "37+45=", "82"),
        ("1+1=", "1+1=", "2"),
    ]


def test_templates_exact() -> None:
    assert format_prompt("math", "P") == "P Let's think step by step and output the final answer within \\boxed{}."
    assert format_prompt("gsm8k", "Q") == 'Q Let\'s think step by step and output the final answer after "####".'
    assert format_prompt("arith", "37+45=") == "37+45="


def test_math_answer_column_wins_and_numbers_become_text(tmp_path: Path) -> None:
    rows = [
        {"problem": "p1", "solution": "so \\boxed{4}", "answer": "4.0"},
        {"problem": "p2", "solution": "no box here", "answer": "7"},
    ]
    ps = load_prompts(cfg("math", write_jsonl(tmp_path / "m.jsonl", rows)), "train")
    assert [r["answer"] for r in ps.rows] == ["4.0", "7"]
    ints = [{"question": "2+2=", "answer": 4}, {"question": "3+3=", "answer": 6.0}]
    ps = load_prompts(cfg("arith", write_parquet(tmp_path / "a.parquet", ints)), "train")
    assert [r["answer"] for r in ps.rows] == ["4", "6"]


def test_key_overrides(tmp_path: Path) -> None:
    rows = [{"q": "What is 6*7?", "final": "42"}, {"q": "What is 2*5?", "final": "#### 10"}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    ps = load_prompts(cfg("gsm8k", path, prompt_key="q", answer_key="final"), "train")
    assert [r["answer"] for r in ps.rows] == ["42", "10"]
    # math with an explicit answer column: its value is used as is when it has no \boxed{}.
    mrows = [{"q": "x?", "final": "\\sqrt{2}"}, {"q": "y?", "final": "so \\boxed{3}"}]
    ps = load_prompts(
        cfg("math", write_jsonl(tmp_path / "m.jsonl", mrows), prompt_key="q", answer_key="final"), "train"
    )
    assert [r["answer"] for r in ps.rows] == ["\\sqrt{2}", "3"]


def test_last_boxed_and_gsm8k_answer() -> None:
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\boxed{\\left\\{ 1 \\right.}") == "\\left\\{ 1 \\right."  # escaped braces ignored
    assert last_boxed("\\boxed{1") is None and last_boxed("no box") is None
    assert gsm8k_answer("work\n#### 1,000 ") == "1,000"
    assert gsm8k_answer("a #### 1 #### 2") == "2"
    assert gsm8k_answer(" 72 ") == "72" and gsm8k_answer("-3.5") == "-3.5"
    assert gsm8k_answer("#### none") is None and gsm8k_answer("She has 5 apples") is None


# ---------------------------------------------------------------- ids and fingerprints


def test_ids_stable_and_format_independent(tmp_path: Path) -> None:
    j = load_prompts(cfg("gsm8k", write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)), "train")
    j2 = load_prompts(cfg("gsm8k", tmp_path / "g.jsonl"), "train")
    p = load_prompts(cfg("gsm8k", write_parquet(tmp_path / "g.parquet", GSM8K_ROWS)), "train")
    assert j.rows == j2.rows == p.rows
    assert j.fingerprint == j2.fingerprint == p.fingerprint
    q, a = GSM8K_ROWS[1]["question"], "72"
    assert j.rows[1]["prompt_id"] == "gsm8k-" + hashlib.sha1(f"{q}\x1f{a}".encode()).hexdigest()[:16]


def test_golden_id_and_fingerprint(tmp_path: Path) -> None:
    # Hard-coded: a change here breaks the V* join of every existing Stage 1 output.
    ps = load_prompts(cfg("arith", write_jsonl(tmp_path / "a.jsonl", ARITH_ROWS[:1])), "train")
    assert ps.rows[0]["prompt_id"] == "arith-" + hashlib.sha1(b"37+45=\x1f82").hexdigest()[:16]
    expected = hashlib.sha256(f"{ps.rows[0]['prompt_id']}\x1f37+45=\x1f82\x1f\x1e".encode()).hexdigest()
    assert ps.fingerprint == expected


def test_fingerprint_changes_with_data(tmp_path: Path) -> None:
    a = load_prompts(cfg("arith", write_jsonl(tmp_path / "a.jsonl", ARITH_ROWS)), "train")
    b = load_prompts(cfg("arith", write_jsonl(tmp_path / "b.jsonl", ARITH_ROWS[::-1])), "train")
    assert a.fingerprint != b.fingerprint


def test_duplicates_get_suffixes(tmp_path: Path) -> None:
    rows = [ARITH_ROWS[0], ARITH_ROWS[1], ARITH_ROWS[0], ARITH_ROWS[0], {"question": "37+45=", "answer": "83"}]
    ps = load_prompts(cfg("arith", write_jsonl(tmp_path / "d.jsonl", rows)), "train")
    ids = [r["prompt_id"] for r in ps.rows]
    assert ids[2] == ids[0] + "-1" and ids[3] == ids[0] + "-2"
    assert ids[4] != ids[0] and len(set(ids)) == 5  # same question, other answer: not a duplicate


# ---------------------------------------------------------------- bad rows

GOOD = json.dumps(GSM8K_ROWS[0])
BAD_LINES = {
    "not_json": ("gsm8k", "{oops", "not valid JSON"),
    "not_object": ("gsm8k", "[1, 2]", "not a JSON object"),
    "missing_prompt": ("gsm8k", json.dumps({"answer": "#### 3"}), "missing prompt column 'question'"),
    "missing_answer": ("gsm8k", json.dumps({"question": "q?"}), "missing answer column 'answer'"),
    "empty_prompt": ("gsm8k", json.dumps({"question": "", "answer": "#### 3"}), "empty prompt"),
    "blank_prompt": ("gsm8k", json.dumps({"question": "  \n", "answer": "#### 3"}), "empty prompt"),
    "null_prompt": ("gsm8k", json.dumps({"question": None, "answer": "#### 3"}), "is null"),
    "empty_answer": ("arith", json.dumps({"question": "1+2=", "answer": " "}), "empty answer"),
    "gsm8k_no_number": ("gsm8k", json.dumps({"question": "q?", "answer": "so #### many"}), "no final number"),
    "math_no_box": ("math", json.dumps({"problem": "p?", "solution": "it is 3"}), "no \\boxed"),
    "math_missing": ("math", json.dumps({"problem": "p?"}), "missing answer column 'solution'"),
}
GOOD_ROW = {"gsm8k": GSM8K_ROWS[0], "math": MATH_ROWS[0], "arith": ARITH_ROWS[0]}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_row_error_names_file_and_line(tmp_path: Path, kind: str) -> None:
    task, line, expected = BAD_LINES[kind]
    path = write_jsonl(tmp_path / "bad_rows.jsonl", [GOOD_ROW[task], GOOD_ROW[task]], raw_lines=(line,))
    with pytest.raises(DataError) as e:
        load_prompts(cfg(task, path), "train")
    msg = str(e.value)
    assert "bad_rows.jsonl line 3" in msg and expected in msg, msg


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_row_skip_counts(tmp_path: Path, kind: str) -> None:
    task, line, _ = BAD_LINES[kind]
    path = write_jsonl(tmp_path / "bad_rows.jsonl", [GOOD_ROW[task]], raw_lines=(line, line))
    ps = load_prompts(cfg(task, path, on_bad_row="skip"), "train")
    assert len(ps) == 1 and ps.skipped == 2


def test_bad_parquet_row_names_row_index(tmp_path: Path) -> None:
    rows = [ARITH_ROWS[0], {"question": "  ", "answer": "1"}, ARITH_ROWS[1]]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet row 1: empty prompt"):
        load_prompts(cfg("arith", path), "train")
    ps = load_prompts(cfg("arith", path, on_bad_row="skip"), "train")
    assert len(ps) == 2 and ps.skipped == 1


def test_skip_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", ARITH_ROWS, raw_lines=("nope", "{}", "nope"))
    with caplog.at_level(logging.WARNING, logger="apo_ray.data"):
        ps = load_prompts(cfg("arith", path, on_bad_row="skip"), "train")
    assert ps.skipped == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 bad prompt rows" in warnings[0] and "w.jsonl line 3" in warnings[0]


def test_blank_lines_and_bom_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(ARITH_ROWS[0]).encode() + b"\r\n\n  \n" + json.dumps(ARITH_ROWS[1]).encode()
    )
    ps = load_prompts(cfg("arith", path), "train")
    assert len(ps) == 2 and ps.skipped == 0


def test_missing_empty_and_unsupported_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl"):
        load_prompts(cfg("arith", tmp_path / "nowhere.jsonl"), "train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(cfg("arith", tmp_path / "empty.jsonl"), "train")
    (tmp_path / "all_bad.jsonl").write_text("x\n")
    with pytest.raises(DataError, match="1 bad rows skipped"):
        load_prompts(cfg("arith", tmp_path / "all_bad.jsonl", on_bad_row="skip"), "train")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(cfg("arith", tmp_path / "data.csv"), "train")
    (tmp_path / "nodata").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .parquet files"):
        load_prompts(cfg("arith", tmp_path / "nodata"), "train")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        load_prompts(cfg("arith", tmp_path / "broken.parquet"), "train")
    with pytest.raises(ValueError, match="split"):
        load_prompts(cfg("arith"), "test")


# ---------------------------------------------------------------- directories, URIs, limits


def test_directory_in_name_order(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    write_parquet(d / "b.parquet", [ARITH_ROWS[1]])
    write_jsonl(d / "a.jsonl", [ARITH_ROWS[0]])
    write_jsonl(d / "c.jsonl", [{"question": "5+5=", "answer": "10"}])
    (d / "_SUCCESS").write_text("")
    (d / "notes.txt").write_text("ignored")
    ps = load_prompts(cfg("arith", d), "train")
    assert [r["question"] for r in ps.rows] == ["37+45=", "1+1=", "5+5="]
    write_jsonl(d / "c.jsonl", [ARITH_ROWS[0]], raw_lines=("bad",))
    with pytest.raises(DataError, match=r"shards/c\.jsonl line 2"):
        load_prompts(cfg("arith", d), "train")


def test_file_uri(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "u.parquet", GSM8K_ROWS)
    local = load_prompts(cfg("gsm8k", path), "train")
    via_uri = load_prompts(cfg("gsm8k", path.as_uri()), "train")
    assert via_uri.rows == local.rows and via_uri.source == path.as_uri()
    write_jsonl(tmp_path / "u2.jsonl", GSM8K_ROWS[:1], raw_lines=("{",))
    with pytest.raises(DataError, match=r"u2\.jsonl line 2"):
        load_prompts(cfg("gsm8k", tmp_path.as_uri() + "/"), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(cfg("gsm8k", (tmp_path / "gone.jsonl").as_uri()), "train")


def test_limits_take_first_good_rows(tmp_path: Path) -> None:
    rows = [{"question": f"{i}+0=", "answer": str(i)} for i in range(6)]
    path = write_jsonl(tmp_path / "lim.jsonl", rows[:2], raw_lines=("bad",) + tuple(json.dumps(r) for r in rows[2:]))
    full = load_prompts(cfg("arith", path, on_bad_row="skip"), "train")
    ps = load_prompts(cfg("arith", path, on_bad_row="skip", max_train_prompts=3), "train")
    assert [r["question"] for r in ps.rows] == ["0+0=", "1+0=", "2+0="] and ps.skipped == 1
    assert ps.rows == full.rows[:3]
    ev = load_prompts(cfg("arith", eval_=path, on_bad_row="skip", max_eval_prompts=1, max_train_prompts=2), "eval")
    assert len(ev) == 1  # (max_*_prompts < 1 is refused at config load: tests/unit/test_config.py)


# ---------------------------------------------------------------- synthetic and hf


def test_synthetic_train_eval_disjoint_and_deterministic() -> None:
    data = cfg("arith", arith=ArithConfig(seed=3, num_train=300, num_eval=100))
    train, train2 = load_prompts(data, "train"), load_prompts(data, "train")
    ev = load_prompts(data, "eval")
    assert len(train) == 300 and len(ev) == 100
    assert train.rows == train2.rows and train.fingerprint == train2.fingerprint
    assert not {r["question"] for r in train.rows} & {r["question"] for r in ev.rows}
    for r in train.rows[:20]:
        a, b = r["question"].rstrip("=").split("+")
        assert r["answer"] == str(int(a) + int(b)) and r["prompt"] == r["question"]
    other = load_prompts(cfg("arith", arith=ArithConfig(seed=4, num_train=300)), "train")
    assert other.fingerprint != train.fingerprint
    capped = load_prompts(cfg("arith", arith=ArithConfig(seed=3, num_train=300), max_train_prompts=10), "train")
    assert capped.rows == train.rows[:10]


def test_synthetic_only_for_arith() -> None:
    with pytest.raises(DataError, match="synthetic"):
        load_prompts(cfg("gsm8k"), "train")


def test_hf_source_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        return iter(GSM8K_ROWS)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = cfg("gsm8k", "hf:openai/gsm8k:main", "hf:openai/gsm8k", eval_split="test")
    train = load_prompts(data, "train")
    ev = load_prompts(data, "eval")
    assert calls == [(("openai/gsm8k", "main"), "train"), (("openai/gsm8k",), "test")]
    assert [r["answer"] for r in train.rows] == ["7", "72", "2,000"] and train.rows == ev.rows

    def failing(*args, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError, match="hub unreachable"):
        load_prompts(data, "train")


def test_hf_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_prompts(cfg("gsm8k", "hf:openai/gsm8k:main"), "train")
