"""The Stage 2 join of training prompts with Stage 1's V* shards (on a hand-written V* output)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apo_ray.config import load_config
from apo_ray.data import load_prompts
from apo_ray.errors import ConfigError, DataError, VStarMismatchError
from apo_ray.train.data import load_train_prompts


def _fingerprint(tmp_path):
    return load_prompts(_cfg(tmp_path).data, "train").fingerprint


def _vstar_output(tmp_path, ids, model="/models/ref", reward_fn="arith", **fields):
    out = tmp_path / "vstar"
    out.mkdir()
    pq.write_table(pa.table({"prompt_id": ids, "vstar": [0.25 * i for i in range(len(ids))]}), out / "s0.parquet")
    manifest = {
        "shards": ["s0.parquet"],
        "model": model,
        "reward_fn": reward_fn,
        "dataset": {"fingerprint": _fingerprint(tmp_path)},
        **fields,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cfg(vstar_dir):
    return load_config("demo", ["data.arith.num_train=4", f"train.vstar_dir={vstar_dir}"])


def test_join_gives_each_prompt_its_vstar(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids))
    prompts = load_train_prompts(cfg, "/models/ref")
    assert [(p.prompt_id, p.vstar) for p in prompts] == [(pid, 0.25 * i) for i, pid in enumerate(ids)]


def test_vstar_of_another_model_is_refused_naming_both(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids, model="/models/old"))
    with pytest.raises(VStarMismatchError, match="model.path is '/models/old' there, '/models/new' here"):
        load_train_prompts(cfg, "/models/new")


def test_vstar_of_other_settings_is_refused_listing_every_difference(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 8, "max_prompt_tokens": 32, "seed": 5}
    out = _vstar_output(tmp_path, ids, num_samples=2, beta1="inf", sampling=sampling)
    with pytest.raises(VStarMismatchError) as e:
        load_train_prompts(_cfg(out), "/models/ref")
    msg = str(e.value)
    for part in ("vstar.num_samples is 2 there, 8 here", "vstar.beta1 is inf there, 0.5 here", "sampling.temperature"):
        assert part in msg, msg
    assert "seed" not in msg  # another sampling seed gives another estimate of the same V*


def test_vstar_of_another_dataset_is_refused(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids)
    cfg = load_config("demo", ["data.arith.num_train=4", "data.arith.seed=7", f"train.vstar_dir={out}"])
    with pytest.raises(VStarMismatchError, match=r"data.\* \(dataset fingerprint\)"):
        load_train_prompts(cfg, "/models/ref")


def test_other_reward_function_is_an_error(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    cfg = _cfg(_vstar_output(tmp_path, ids, reward_fn="gsm8k"))
    with pytest.raises(VStarMismatchError, match="gsm8k"):
        load_train_prompts(cfg, "/models/ref")


def test_missing_prompt_names_it_and_the_directory(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids[:-1])
    with pytest.raises(VStarMismatchError, match=ids[-1]) as e:
        load_train_prompts(_cfg(out), "/models/ref")
    assert str(out) in str(e.value)


# ---------------------------------------------------------------- V* that cannot be trusted


def _shard(out, name, ids, vstar, rewards=None):
    cols = {"prompt_id": ids, "vstar": vstar}
    if rewards is not None:
        cols["rewards"] = pa.array(rewards, pa.list_(pa.float64()))
    pq.write_table(pa.table(cols), out / name)


def _manifest(out, shards):
    fingerprint = _fingerprint(out.parent)
    manifest = {"shards": shards, "model": "/models/ref", "reward_fn": "arith", "dataset": {"fingerprint": fingerprint}}
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "vstar, rewards, message",
    [
        (float("nan"), [0.0, 1.0], "not a finite number"),
        (float("inf"), None, "not a finite number"),
        (9.0, [0.0, 1.0], r"outside the range of its rewards \[0.0, 1.0\]"),
        (-0.1, [0.0, 0.0], "outside the range"),
        (0.5, [0.0, float("nan")], "not all finite"),
    ],
)
def test_vstar_that_is_not_finite_or_out_of_range_is_refused_naming_shard_and_prompt(tmp_path, vstar, rewards, message):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = tmp_path / "vstar"
    out.mkdir()
    good = [[0.0, 1.0]] * (len(ids) - 1)
    _shard(out, "s0.parquet", ids, [0.3] * (len(ids) - 1) + [vstar], None if rewards is None else good + [rewards])
    _manifest(out, ["s0.parquet"])
    with pytest.raises(DataError, match=message) as e:
        load_train_prompts(_cfg(out), "/models/ref")
    assert ids[-1] in str(e.value) and "s0.parquet" in str(e.value)


def test_prompt_in_two_shards_is_refused_naming_both(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = tmp_path / "vstar"
    out.mkdir()
    _shard(out, "s0.parquet", ids[:2], [0.1, 0.2])
    _shard(out, "s1.parquet", ids[1:], [0.2, 0.3, 0.4])
    _manifest(out, ["s0.parquet", "s1.parquet"])
    with pytest.raises(DataError, match=rf"{ids[1]}.*s0.parquet and .*s1.parquet"):
        load_train_prompts(_cfg(out), "/models/ref")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_is_one_clear_error(tmp_path, damage):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids)
    shard = out / "s0.parquet"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataError, match=r"V\* shard .*s0.parquet cannot be read") as e:
        load_train_prompts(_cfg(out), "/models/ref")
    assert "\n" not in str(e.value)


def test_corrupt_manifest_is_one_clear_error(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids)
    (out / "manifest.json").write_text('{"shards": ["s0.parq')
    with pytest.raises(DataError, match=r"manifest.json is not a Stage 1 manifest"):
        load_train_prompts(_cfg(out), "/models/ref")


# ---------------------------------------------------------------- Stage 1's reward, as the manifest records it


def _reward_cfg(vstar_dir, *overrides):
    return load_config("demo", ["data.arith.num_train=4", f"train.vstar_dir={vstar_dir}", *overrides])


def test_stage1_reward_named_apart_from_stage2_is_accepted(tmp_path):
    # The GSM8K paper configs: V* scored with the official flexible rule, Stage 2 with the strict one.
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids, reward_fn="gsm8k_flexible")
    cfg = _reward_cfg(out, "reward.fn=gsm8k_strict", "vstar.reward_fn=gsm8k_flexible")
    assert len(load_train_prompts(cfg, "/models/ref")) == len(ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # vstar.reward_fn unset: Stage 1 scored with reward.fn, so that is the key to name
        (["reward.fn=gsm8k_strict"], "reward.fn is 'gsm8k_flexible' there, 'gsm8k_strict' here"),
        (["vstar.reward_fn=gsm8k"], "vstar.reward_fn is 'gsm8k_flexible' there, 'gsm8k' here"),
        (["reward.fn=gsm8k_flexible", "vstar.reward_fn=gsm8k_strict"], "vstar.reward_fn is 'gsm8k_flexible' there"),
    ],
)
def test_stage1_reward_other_than_the_config_names_is_refused(tmp_path, overrides, message):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids, reward_fn="gsm8k_flexible")
    with pytest.raises(VStarMismatchError, match=message) as e:
        load_train_prompts(_reward_cfg(out, *overrides), "/models/ref")
    assert "vstar.reward_fn, or reward.fn when that is unset" in str(e.value)


def test_misspelt_stage1_reward_names_its_key(tmp_path):
    ids = [r["prompt_id"] for r in load_prompts(_cfg(tmp_path).data, "train").rows]
    out = _vstar_output(tmp_path, ids)
    with pytest.raises(ConfigError, match=r"^config key 'vstar.reward_fn': unknown reward fn 'gsm8k_flex'"):
        load_train_prompts(_reward_cfg(out, "vstar.reward_fn=gsm8k_flex"), "/models/ref")


# ---------------------------------------------------------------- GRPO drops too-long prompts as Stage 1 does


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny model's tokenizer (one token per character) saved as a model directory would hold it."""
    from apo_ray.model.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(d)
    return str(d)


def test_grpo_drops_prompts_longer_than_max_prompt_tokens_by_stage1s_count(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from apo_ray.data import prompt_token_counts

    overrides = ["data.arith.num_train=40", "train.algo=grpo", "sampling.max_prompt_tokens=5"]
    cfg = load_config("demo", overrides)
    rows = load_prompts(cfg.data, "train").rows
    # "7+45=" is 5 tokens (kept), "37+45=" 6 (dropped): both kinds are in the set
    assert {len(r["prompt"]) for r in rows} >= {5, 6}
    lengths = prompt_token_counts(AutoTokenizer.from_pretrained(tokenizer_dir), [r["prompt"] for r in rows])
    assert lengths == [len(r["prompt"]) for r in rows]  # the count Stage 1's actors drop by
    want = [r["prompt_id"] for r, n in zip(rows, lengths) if n <= 5]
    prompts = load_train_prompts(cfg, tokenizer_dir)
    assert [p.prompt_id for p in prompts] == want and all(p.vstar == 0.0 for p in prompts)
    assert len(load_train_prompts(load_config("demo", overrides[:2]), tokenizer_dir)) == len(rows)  # 32 tokens: all


def test_grpo_with_every_prompt_too_long_names_the_key(tmp_path, tokenizer_dir):
    cfg = load_config("demo", ["data.arith.num_train=4", "train.algo=grpo", "sampling.max_prompt_tokens=2"])
    with pytest.raises(ConfigError, match=r"^config key 'sampling.max_prompt_tokens': all 4 training prompts"):
        load_train_prompts(cfg, tokenizer_dir)
