"""Stage 1 on an autoscaling cluster: Ray's fake multi-node autoscaler (the provider Ray's own
autoscaler tests use) starts worker nodes on this machine as the actor pool asks for them, and
stops them after the idle timeout.

The head has no CPU (the job's driver needs none); the worker node type has 2 CPUs and starts at 0 nodes, so
every engine actor (2 CPUs) needs a node the autoscaler adds. The test prints the timeline of
nodes and pool actors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from itest_utils import REPO
from ray_cluster import RayCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def autoscaling_cluster(tmp_path):
    # The head has no CPU: the job's driver needs none, and Ray Data asks for nodes when the cluster's
    # CPUs are >= 75 % in use (an idle head CPU would keep a one-node pool below that).
    c = RayCluster(tmp_path, head_cpus=0)
    try:
        c.start_head(
            autoscaling={"cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3}}
        )
        yield c
    finally:
        c.stop()


def _pool_actors(c: RayCluster) -> int:
    out = c.ray("list", "actors", "--address", c.url, "--format=json", "--filter", "state=ALIVE", "--limit", "1000")
    try:
        return sum("ShardSampler" in a.get("class_name", "") for a in json.loads(out.stdout))
    except json.JSONDecodeError:
        return -1


def test_stage1_pool_grows_onto_nodes_the_autoscaler_adds_then_they_go(autoscaling_cluster, tiny_model_dir, tmp_path):
    c = autoscaling_cluster
    assert len(c.alive_nodes()) == 1, "starts with the head alone"
    timeline: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        t0 = time.time()
        while not stop.is_set():
            timeline.append((round(time.time() - t0, 1), len(c.alive_nodes()) - 1, _pool_actors(c)))
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "vstar"
    # The driver runs on the head as `python jobs/vstar.py` with RAY_ADDRESS, not through
    # `ray job submit --working-dir`: on one machine every node shares the session's
    # runtime_resources directory, and a node that no longer uses the job's working_dir package
    # (its actors exited; here, a node released by the autoscaler) deletes it from under the
    # others. Ray Data's cluster autoscaler (in the driver) averages utilisation over 10 s and
    # asks at most every 10 s: shortened for the test, as AUTOSCALER_UPDATE_INTERVAL_S is.
    env = {
        **c.env,
        "RAY_ADDRESS": c.gcs,
        "RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S": "2",
        "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2",
    }
    driver = subprocess.Popen(
        [
            sys.executable,
            "jobs/vstar.py",
            "--config",
            "demo",
            f"model.path={tiny_model_dir}",
            f"vstar.output_dir={out}",
            "data.arith.num_train=4096",
            "vstar.shard_size=32",
            "vstar.batch_size=32",
            # ~80 s of sampling for one actor: long enough that the actors on the nodes added while
            # it runs (~15 s each here) write shards too, on a slower machine as well.
            "vstar.num_samples=32",
            "vstar.min_actors=1",
            "vstar.max_actors=3",
            "resources.cpus_per_actor=2",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        logs, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, logs[-5000:]
        assert "Stage 1 done: 4096 rows" in logs
        deadline = time.time() + 180  # idle_timeout_minutes=0.25: the nodes go ~15 s after their actors
        while time.time() < deadline and len(c.alive_nodes()) > 1:
            time.sleep(2)
    finally:
        if driver.poll() is None:
            driver.kill()
        stop.set()
        watcher.join(timeout=30)
    print("\nseconds, worker nodes, pool actors:")
    for row in timeline[:: max(1, len(timeline) // 60)]:
        print(*row)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(pq.read_table(out / n).num_rows for n in manifest["shards"]) == 4096
    # Each engine actor takes a whole added node (2 CPUs; the head has none), so shards written on
    # two or more nodes mean the pool grew past its minimum of 1 onto nodes the autoscaler added.
    # (The timeline above samples through `ray list` every few seconds: a report, not a proof.)
    head = next(n["node_id"] for n in c.alive_nodes() if n["is_head_node"])
    assert len(manifest["nodes"]) >= 2 and head not in manifest["nodes"], manifest["nodes"]
    assert len(c.alive_nodes()) == 1, "the added nodes were released after the idle timeout"
