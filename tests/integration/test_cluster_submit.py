"""A real Ray cluster and its real client: `ray start --head`, then `ray job submit --working-dir .`.

The head runs in its own process group (`ray_cluster.RayCluster`), and the test stops exactly
that group: other Ray instances on the machine are left alone. Stage 1 submitted this way, on
several nodes, is in test_multinode.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from ray_cluster import RayCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head(tmp_path):
    c = RayCluster(tmp_path, head_cpus=4)
    try:
        c.start_head()
        yield c
    finally:
        c.stop()
    # `ray start --block` stopped by signal leaves its address file; the fixture removes it
    assert not c.address_file_names_head(), f"{c.address_file()} still names the stopped head"


def test_stopped_stage2_job_resubmitted_resumes_without_gap_or_repeat(ray_head, tiny_model_dir, tmp_path):
    """`ray job stop` mid-run, then the same `ray job submit`: the run resumes from the last complete
    checkpoint and metrics.jsonl holds every step once. (GRPO: it needs no Stage 1 output.)"""
    c = ray_head
    out = tmp_path / "train"
    job = [
        "jobs/train.py",
        "--config",
        "demo",
        f"model.path={tiny_model_dir}",
        f"train.output_dir={out}",
        "train.algo=grpo",
        "train.group_size=2",
        "train.num_steps=150",
        "train.save_every=4",
        "train.eval_every=0",
        "train.tensorboard=false",
    ]
    first = c.submit(*job)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.3)
    stop = c.ray("job", "stop", "--address", c.url, first)
    assert stop.returncode == 0, stop.stderr[-2000:]
    status, logs = c.wait(first)
    assert re.search(r"stopped", status, re.IGNORECASE), f"{status}\n{logs[-3000:]}"
    steps_before = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert 10 <= len(steps_before) < 150, "the job should have been stopped part-way"

    second = c.submit(*job)
    status, logs = c.wait(second)
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n{logs[-4000:]}"
    resumed = int(re.search(r"resuming after step (\d+)", logs).group(1))
    assert resumed % 4 == 0 and resumed <= steps_before[-1]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 151)), "every step once: the rows after the checkpoint were redone, not repeated"
