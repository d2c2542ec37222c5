"""Both stages on a real three-node Ray cluster on this machine, submitted as a user does.

A head (1 CPU: the job drivers) and two worker nodes of 2 CPUs each (`ray start`, each node its
own process group: `ray_cluster.RayCluster`). One engine actor or one learner with its replica
needs 2 CPUs, so a pool of 2 and a group of 2 learners must span both workers. Outputs go to a
real S3 endpoint (moto on localhost), its credentials given to the job as a user gives them:
`ray job submit --runtime-env-json '{"env_vars": {...}}'`.

The tests run in file order and share the cluster (the last resumes the Stage 2 run of an
earlier one): the last two lose a node each (SIGKILL to its process group) and add a replacement.
"""

from __future__ import annotations

import json
import re
import time

import pyarrow.parquet as pq
import pytest
from ray_cluster import RayCluster
from s3_server import BUCKET, bucket_fs, moto_server, read_text

from apo_ray.metrics import parse_metrics

pytestmark = pytest.mark.integration
VSTAR = f"s3://{BUCKET}/mn/vstar"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto-mn")) as env:
        yield env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = RayCluster(tmp_path_factory.mktemp("cluster"), head_cpus=1)
    try:
        c.start_head()
        c.add_worker(2)
        c.add_worker(2)
        c.runtime_env = {"env_vars": s3}
        yield c
    finally:
        c.stop()


def _stage1(model, *extra: str) -> list[str]:
    return [
        "jobs/vstar.py",
        "--config",
        "demo",
        f"model.path={model}",
        "data.arith.num_train=128",
        "vstar.shard_size=16",
        "vstar.num_samples=4",
        "vstar.min_actors=2",
        "vstar.max_actors=2",
        "resources.cpus_per_actor=2",
        *extra,
    ]


def _stage2(model, out: str, *extra: str) -> list[str]:
    return [
        "jobs/train.py",
        "--config",
        "demo",
        f"model.path={model}",
        "data.arith.num_train=128",
        f"train.vstar_dir={VSTAR}",
        "vstar.num_samples=4",
        f"train.output_dir={out}",
        "train.num_learners=2",
        "train.rollout_batch_size=16",
        "train.mini_batch_size=16",
        "train.micro_batch_size=8",
        "train.save_every=2",
        "train.eval_every=0",
        "train.tensorboard=false",
        "resources.cpus_per_actor=1",
        *extra,
    ]


def _succeeded(cluster: RayCluster, job_id: str, timeout_s: float = 600) -> str:
    status, logs = cluster.wait(job_id, timeout_s)
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n{logs[-5000:]}"
    return logs


@pytest.fixture(scope="module")
def stage1(cluster, tiny_model_dir) -> str:
    """Stage 1 into the bucket (VSTAR), submitted to the cluster; its job logs. Stage 2 reads it."""
    return _succeeded(cluster, cluster.submit(*_stage1(tiny_model_dir, f"vstar.output_dir={VSTAR}")))


def test_stage1_pool_spans_both_worker_nodes_and_writes_to_s3(cluster, s3, stage1):
    assert "Stage 1 done: 128 rows" in stage1
    fs = bucket_fs(s3)
    manifest = json.loads(read_text(fs, f"{BUCKET}/mn/vstar/manifest.json"))
    rows = sum(pq.read_table(f"{BUCKET}/mn/vstar/{n}", filesystem=fs).num_rows for n in manifest["shards"])
    assert rows == manifest["counts"]["rows_written"] == 128
    workers = {n["node_id"] for n in cluster.alive_nodes() if not n["is_head_node"]}
    assert set(manifest["nodes"]) == workers, "both worker nodes wrote shards (the manifest names them)"


def test_stage2_refuses_a_local_output_dir_when_learners_span_nodes(cluster, stage1, tiny_model_dir, tmp_path):
    status, logs = cluster.wait(cluster.submit(*_stage2(tiny_model_dir, str(tmp_path / "t"), "train.num_steps=2")))
    assert re.search(r"failed", status, re.IGNORECASE), logs[-3000:]
    assert "config key 'train.output_dir'" in logs and "learners run on 2 nodes" in logs, logs[-3000:]


TRAIN, TRAIN_PREFIX = f"s3://{BUCKET}/mn/train", f"{BUCKET}/mn/train"  # the run of the two Stage 2 tests below


def test_stage2_two_learners_on_two_nodes_train_into_s3(cluster, s3, stage1, tiny_model_dir):
    """DeepSpeed data parallel over gloo across two nodes, each learner with its own replica;
    checkpoints, metrics and the final model land in the bucket. (The last test resumes this run.)"""
    logs = _succeeded(cluster, cluster.submit(*_stage2(tiny_model_dir, TRAIN, "train.num_steps=2")))
    assert "2 learner(s)" in logs
    fs = bucket_fs(s3)
    assert fs.get_file_info(f"{TRAIN_PREFIX}/ray/step_000002/.apo_complete").size == 0
    assert fs.get_file_info(f"{TRAIN_PREFIX}/final/model.safetensors").size > 0
    assert [r["step"] for r in parse_metrics(read_text(fs, f"{TRAIN_PREFIX}/metrics.jsonl"))] == [1, 2]


def test_stage1_finishes_when_a_worker_node_is_lost(cluster, s3, tiny_model_dir):
    """SIGKILL one worker node mid-run: its actor and in-flight shards are lost; the job finishes on
    the other node with every prompt exactly once."""
    job = cluster.submit(
        *_stage1(tiny_model_dir, f"vstar.output_dir=s3://{BUCKET}/mn/lost", "data.arith.num_train=512")
    )
    fs = bucket_fs(s3)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [i for i in fs.get_file_info(_selector(f"{BUCKET}/mn/lost")) if i.path.endswith(".parquet")]
        if len(done) >= 4:
            break
        time.sleep(0.5)
    assert 4 <= len(done) < 32, "the node should be lost part-way"
    cluster.kill(cluster.workers[-1])
    logs = _succeeded(cluster, job)
    manifest = json.loads(read_text(fs, f"{BUCKET}/mn/lost/manifest.json"))
    ids = []
    for name in manifest["shards"]:
        ids += pq.read_table(f"{BUCKET}/mn/lost/{name}", filesystem=fs).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == 512, "every prompt exactly once"
    assert "Stage 1 done: 512 rows" in logs
    cluster.add_worker(2)  # a replacement for the next test


def test_stage2_resumes_from_s3_then_restarts_when_a_learner_node_is_lost(cluster, s3, stage1, tiny_model_dir):
    """The same command with more steps resumes the run above from the bucket; then SIGKILL the
    node of one learner after a checkpoint; a replacement node joins; Ray Train restarts the group
    (train.max_failures=1) from the last complete checkpoint: every step once."""
    job = cluster.submit(*_stage2(tiny_model_dir, TRAIN, "train.num_steps=24", "train.max_failures=1"))
    fs, prefix = bucket_fs(s3), TRAIN_PREFIX
    deadline, checked = time.time() + 400, time.time()
    while _last_complete_step(fs, prefix) < 6:  # (train.keep_checkpoints=2: older ones are deleted)
        assert time.time() < deadline, "no checkpoint at step 6 or later in time"
        if time.time() - checked > 10:
            checked = time.time()
            assert not re.search(r"failed|succeeded", cluster.status(job), re.IGNORECASE), cluster.logs_of(job)[-4000:]
        time.sleep(0.3)
    cluster.kill(cluster.workers[-1])  # each worker node holds one learner: this is one of them
    cluster.add_worker(2)
    logs = _succeeded(cluster, job, timeout_s=900)
    assert "resuming after step 2" in logs
    rows = parse_metrics(read_text(fs, f"{prefix}/metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 25)), "every step once, none repeated"
    restarts = [int(x) for x in re.findall(r"resumed from step (\d+)", logs)]
    assert any(step >= 6 for step in restarts), logs[-4000:]  # the restart after the node loss


def _last_complete_step(fs, prefix: str) -> int:
    steps = [
        int(i.base_name[5:])
        for i in fs.get_file_info(_selector(f"{prefix}/ray"))
        if i.base_name.startswith("step_") and fs.get_file_info(f"{i.path}/.apo_complete").is_file
    ]
    return max(steps, default=0)


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, allow_not_found=True)
