"""A real Ray cluster and its real client: `ray start --head`, then `ray job submit --working-dir .`.

The head runs in its own session (`ray start --block` in a new process group), and the
test stops exactly that group: other Ray instances on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from itest_utils import REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Token auth, as Ray 2.60 sets up by default for new clusters: the head and the CLI share the
    # token through the environment (a user exports RAY_AUTH_TOKEN, or keeps it in ~/.ray/auth_token).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
        ],
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers: 401 when Ray's token auth is on (a ~/.ray/auth_token exists); the CLI sends it
            except OSError:
                assert time.time() < deadline, "Ray head dashboard did not come up"
                time.sleep(1)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything left in its process group
        except ProcessLookupError:
            pass


def _ray(env, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _submit(url: str, env, *job: str) -> str:
    """`ray job submit --working-dir . --no-wait -- python JOB...`, as a user types it; returns the job id."""
    done = _ray(env, "job", "submit", "--address", url, "--working-dir", str(REPO), "--no-wait", "--", "python", *job)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"(raysubmit_\w+)", done.stdout + done.stderr).group(1)


def _wait(url: str, env, job_id: str, timeout_s: float = 400) -> tuple[str, str]:
    """(final status text, logs) of a job."""
    deadline, status = time.time() + timeout_s, ""
    while time.time() < deadline:
        st = _ray(env, "job", "status", "--address", url, job_id)
        status = st.stdout + st.stderr
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):  # "Job 'ID' succeeded" in 2.60
            break
        time.sleep(3)
    return status, _ray(env, "job", "logs", "--address", url, job_id).stdout


def test_ray_job_submit_runs_stage1(ray_head, tiny_model_dir, tmp_path):
    url, env = ray_head
    out = tmp_path / "vstar"
    job_id = _submit(
        url,
        env,
        "jobs/vstar.py",
        "--config",
        "demo",
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={out}",
        "data.arith.num_train=48",
        "vstar.shard_size=16",
        "vstar.num_samples=4",
    )
    status, logs = _wait(url, env, job_id)
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n{logs[-4000:]}"
    assert "Stage 1 done: 48 rows" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    rows = sum(pq.read_table(out / name).num_rows for name in manifest["shards"])
    assert rows == manifest["counts"]["rows_written"] == 48


def test_stopped_stage2_job_resubmitted_resumes_without_gap_or_repeat(ray_head, tiny_model_dir, tmp_path):
    """`ray job stop` mid-run, then the same `ray job submit`: the run resumes from the last complete
    checkpoint and metrics.jsonl holds every step once. (GRPO: it needs no Stage 1 output.)"""
    url, env = ray_head
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
    first = _submit(url, env, *job)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.3)
    stop = _ray(env, "job", "stop", "--address", url, first)
    assert stop.returncode == 0, stop.stderr[-2000:]
    status, logs = _wait(url, env, first)
    assert re.search(r"stopped", status, re.IGNORECASE), f"{status}\n{logs[-3000:]}"
    steps_before = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert 10 <= len(steps_before) < 150, "the job should have been stopped part-way"

    second = _submit(url, env, *job)
    status, logs = _wait(url, env, second)
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n{logs[-4000:]}"
    resumed = int(re.search(r"resuming after step (\d+)", logs).group(1))
    assert resumed % 4 == 0 and resumed <= steps_before[-1]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 151)), "every step once: the rows after the checkpoint were redone, not repeated"
