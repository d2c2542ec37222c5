"""s3:// outputs through a real S3 HTTP endpoint on localhost (moto's standalone server, as Ray's and
pyarrow's own S3 tests use), given the way a user points apo-ray at MinIO or a bucket: the standard
AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables in the driver's environment,
which apo-ray passes on to every actor and worker. The server is started and stopped by pid."""

from __future__ import annotations

import json
import time

import pytest
from itest_utils import demo_config
from s3_server import BUCKET, bucket_fs, read_text

from apo_ray.metrics import parse_metrics

pytestmark = pytest.mark.integration


def test_stage1_to_s3_with_resume_and_lock_then_stage2_reads_it(ray_session, s3_endpoint, tiny_model_dir, caplog):
    import pyarrow.parquet as pq

    from apo_ray import train, vstar
    from apo_ray.errors import OutputLockedError

    uri = f"s3://{BUCKET}/run1/vstar"
    args = [f"model.path={tiny_model_dir}", f"vstar.output_dir={uri}", "data.arith.num_train=64", "vstar.shard_size=32"]
    manifest = vstar.run(demo_config(*args))
    fs = bucket_fs(s3_endpoint)
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

    # Stage 2 into the bucket too: Ray Train checkpoints there, rank 0 publishes metrics.jsonl and the
    # final model; a rerun with more steps resumes from the bucket's newest complete checkpoint.
    out = f"s3://{BUCKET}/run1/train"
    stage2 = [
        f"model.path={tiny_model_dir}",
        "data.arith.num_train=64",
        f"train.vstar_dir={uri}",
        f"train.output_dir={out}",
        "train.save_every=2",
        "train.eval_every=0",
    ]
    first = train.run(demo_config(*stage2, "train.num_steps=2"))
    assert first["final_model"] == f"{out}/final"
    prefix = f"{BUCKET}/run1/train"
    assert fs.get_file_info(f"{prefix}/ray/step_000002/.apo_complete").size == 0
    assert fs.get_file_info(f"{prefix}/final/config.json").size > 0
    with caplog.at_level("INFO", logger="apo_ray.train"):
        train.run(demo_config(*stage2, "train.num_steps=3"))
    assert "resuming after step 2" in caplog.text
    assert [r["step"] for r in parse_metrics(read_text(fs, f"{prefix}/metrics.jsonl"))] == [1, 2, 3]
    assert json.loads(read_text(fs, f"{prefix}/summary.json"))["steps"] == 3
    assert "train" in read_text(fs, f"{prefix}/config.yaml")


def test_stage1_on_s3_redoes_only_missing_shards(ray_session, s3_endpoint, tiny_model_dir):
    from apo_ray import vstar

    uri = f"s3://{BUCKET}/run2/vstar"
    args = [f"model.path={tiny_model_dir}", f"vstar.output_dir={uri}", "data.arith.num_train=64", "vstar.shard_size=16"]
    vstar.run(demo_config(*args))
    fs = bucket_fs(s3_endpoint)
    fs.delete_file(f"{BUCKET}/run2/vstar/shard-00002.parquet")  # as if that shard's actor had died
    fs.delete_file(f"{BUCKET}/run2/vstar/manifest.json")
    kept = fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00000.parquet").mtime
    again = vstar.run(demo_config(*args))
    assert again["complete"] and again["counts"]["rows_written"] == 64
    assert fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00002.parquet").size > 0
    assert fs.get_file_info(f"{BUCKET}/run2/vstar/shard-00000.parquet").mtime == kept
