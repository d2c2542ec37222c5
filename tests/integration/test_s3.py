"""s3:// outputs through a real S3 HTTP endpoint on localhost (moto's standalone server, as Ray's and
pyarrow's own S3 tests use), given the way a user points apo-ray at MinIO or a bucket: the standard
AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables in the driver's environment,
which apo-ray passes on to every actor and worker. The server is started and stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from itest_utils import demo_config

from apo_ray.metrics import read_metrics

pytestmark = pytest.mark.integration
BUCKET = "apo-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _fs():
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def test_stage1_to_s3_with_resume_and_lock_then_stage2_reads_it(ray_session, s3_endpoint, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from apo_ray import train, vstar
    from apo_ray.errors import OutputLockedError

    uri = f"s3://{BUCKET}/run1/vstar"
    args = [f"model.path={tiny_model_dir}", f"vstar.output_dir={uri}", "data.arith.num_train=64", "vstar.shard_size=32"]
    manifest = vstar.run(demo_config(*args))
    fs = _fs()
    assert manifest["complete"] and manifest["counts"]["rows_written"] == 64
    rows = sum(pq.read_table(f"{BUCKET}/run1/vstar/{n}", filesystem=fs).num_rows for n in manifest["shards"])
    assert rows == 64 and manifest["nodes"]  # the Ray node(s) that wrote the shards
    # A finished output is reused, not recomputed (the same rule as on a local path).
    assert vstar.run(demo_config(*args))["wall_time_s"] == manifest["wall_time_s"]
    # A second writer is refused while the other's heartbeat is fresh (another host: no pid to check).
    lock = {"host": "another-host", "pid": 1, "time": time.time()}
    with fs.open_output_stream(f"{BUCKET}/run1/vstar/.lock") as f:
        f.write(json.dumps(lock).encode())
    with pytest.raises(OutputLockedError, match="being written by another job"):
        vstar.run(demo_config(*args, "vstar.overwrite=true"))
    fs.delete_file(f"{BUCKET}/run1/vstar/.lock")

    out = tmp_path / "train"
    train.run(
        demo_config(
            f"model.path={tiny_model_dir}",
            "data.arith.num_train=64",
            f"train.vstar_dir={uri}",
            f"train.output_dir={out}",
            "train.num_steps=2",
            "train.eval_every=0",
        )
    )
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_stage1_on_s3_redoes_only_missing_shards(ray_session, s3_endpoint, tiny_model_dir):
    from apo_ray import vstar

    uri = f"s3://{BUCKET}/run2/vstar"
    args = [f"model.path={tiny_model_dir}", f"vstar.output_dir={uri}", "data.arith.num_train=64", "vstar.shard_size=16"]
    vstar.run(demo_config(*args))
    fs = _fs()
    fs.delete_file(f"{BUCKET}/run2/vstar/shard-00002.parquet")  # as if that shard's actor had died
    fs.delete_file(f"{BUCKET}/run2/vstar/manifest.json")
    kept = fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00000.parquet").mtime
    again = vstar.run(demo_config(*args))
    assert again["complete"] and again["counts"]["rows_written"] == 64
    assert fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00002.parquet").size > 0
    assert fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00000.parquet").mtime == kept
