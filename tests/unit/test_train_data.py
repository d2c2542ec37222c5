"""The Stage 2 join of training prompts with Stage 1's V* shards (on a hand-written V* output)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apo_ray.config import load_config
from apo_ray.data import load_prompts
from apo_ray.errors import VStarMismatchError
from apo_ray.train.data import load_train_prompts


def _vstar_output(tmp_path, ids, model="/models/ref", reward_fn="arith"):
    out = tmp_path / "vstar"
    out.mkdir()
    pq.write_table(pa.table({"prompt_id": ids, "vstar": [0.25 * i for i in range(len(ids))]}), out / "s0.parquet")
    manifest = {"shards": ["s0.parquet"], "model": model, "reward_fn": reward_fn, "dataset": {"fingerprint": "x"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cfg(vstar_dir):
    return load_config("demo", ["data.arith.num_train=4", f"train.vstar_dir={vstar_dir}"])


def test_join_gives_each_prompt_its_vstar(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids))
    prompts = load_train_prompts(cfg, "arith", "/models/ref")
    assert [(p.prompt_id, p.vstar) for p in prompts] == [(pid, 0.25 * i) for i, pid in enumerate(ids)]


def test_vstar_of_another_model_warns_naming_both(tmp_path, caplog):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids, model="/models/old"))
    with caplog.at_level(logging.WARNING, logger="apo_ray.train"):
        load_train_prompts(cfg, "arith", "/models/new")
    assert "/models/old" in caplog.text and "/models/new" in caplog.text


def test_other_reward_function_is_an_error(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids, reward_fn="gsm8k"))
    with pytest.raises(VStarMismatchError, match="gsm8k"):
        load_train_prompts(cfg, "arith", "/models/ref")


def test_missing_prompt_names_it_and_the_directory(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids[:-1])
    with pytest.raises(VStarMismatchError, match=ids[-1]) as e:
        load_train_prompts(_cfg(out), "arith", "/models/ref")
    assert str(out) in str(e.value)
