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


def test_ray_job_submit_runs_stage1(ray_head, tiny_model_dir, tmp_path):
    url, env = ray_head
    out = tmp_path / "vstar"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--",
            "python",
            "jobs/vstar.py",
            "--config",
            "demo",
            f"model.path={tiny_model_dir}",
            f"vstar.output_dir={out}",
            "data.arith.num_train=48",
            "vstar.shard_size=16",
            "vstar.num_samples=4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
    deadline, status = time.time() + 400, ""
    while time.time() < deadline:
        st = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", url, job_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        status = st.stdout + st.stderr
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):  # "Job 'ID' succeeded" in 2.60
            break
        time.sleep(3)
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", url, job_id], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n{logs[-4000:]}"
    assert "Stage 1 done: 48 rows" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    rows = sum(pq.read_table(out / name).num_rows for name in manifest["shards"])
    assert rows == manifest["counts"]["rows_written"] == 48
