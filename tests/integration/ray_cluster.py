"""A real multi-node Ray cluster on this machine, and its real client (`ray job submit`).

Each node is a `ray start --block` in a process group of its own (the head with the dashboard,
workers joined with `--address`), so a test can stop exactly one node, as a lost machine
would (SIGKILL to its group: raylet, object store and every worker process of that node), and
the fixture stops exactly what it started, by process group; other Ray instances on the machine
are left alone.
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
from dataclasses import dataclass, field
from pathlib import Path

from itest_utils import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    """A head node (dashboard, GCS) and worker nodes started with `ray start`, each its own process group."""

    logs: Path
    head_cpus: int = 4
    env: dict = field(default_factory=dict)
    gcs: str = ""
    url: str = ""
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    runtime_env: dict | None = None  # given to every submitted job (`--runtime-env-json`)
    _joined: int = 0

    def __post_init__(self) -> None:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        # Token auth, as Ray 2.60 sets up by default for new clusters: the nodes and the CLI share the
        # token through the environment (a user exports RAY_AUTH_TOKEN, or keeps it in ~/.ray/auth_token).
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env = env

    def start_head(self, autoscaling: dict | None = None) -> None:
        """Start the head; with `autoscaling` (worker node types), under Ray's fake multi-node
        autoscaler, which starts and stops worker nodes on this machine (see `autoscaling_config`)."""
        port, dash = free_port(), free_port()
        self.gcs, self.url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        extra = []
        if autoscaling is not None:
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            path = self.logs / "autoscaling.json"
            path.write_text(json.dumps(autoscaling_config(self.gcs, self.head_cpus, autoscaling, FAKE_HEAD_NODE_ID)))
            extra.append(f"--autoscaling-config={path}")
            # As ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) sets them (that class also
            # runs `ray stop --force`, which would stop every Ray on the machine: not used).
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_enable_autoscaler_v2="1")
            head_env = {
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            }
        else:
            head_env = {}
        self._start(
            "head",
            *extra,
            "--head",
            f"--port={port}",
            f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            env=head_env,
        )
        deadline = time.time() + 180
        while True:
            self._check_alive("head")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers: 401 when Ray's token auth is on; the CLI sends the token
            except OSError:
                assert time.time() < deadline, "Ray head dashboard did not come up"
                time.sleep(1)

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> str:
        """Join a worker node with `num_cpus` CPUs and custom `resources`; returns its name once the cluster sees it."""
        self._joined += 1
        name = f"w{self._joined}"
        before = {n["node_id"] for n in self.alive_nodes()}
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self._start(name, *args)
        deadline = time.time() + 120
        while not {n["node_id"] for n in self.alive_nodes()} - before:  # a lost node may still be listed
            self._check_alive(name)
            assert time.time() < deadline, f"worker node {name} did not join: {self.log(name)[-2000:]}"
            time.sleep(1)
        return name

    @property
    def workers(self) -> list[str]:
        """Names of the live worker nodes this cluster started, oldest first."""
        return [n for n in self.nodes if n != "head"]

    def kill(self, name: str) -> None:
        """Lose a node: SIGKILL to its whole process group (no clean shutdown)."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        head = "head" in self.nodes
        for name in [n for n in self.nodes if n != "head"] + (["head"] if head else []):
            proc = self.nodes.pop(name)
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its process group
            except ProcessLookupError:
                pass
        if head:
            self._forget_address()

    def address_file(self) -> Path:
        """Where `ray start --head` wrote its address (Ray's temp dir as the head's environment sets it,
        by Ray's rule on Linux: $RAY_TMPDIR, else $TMPDIR, else /tmp)."""
        base = self.env.get("RAY_TMPDIR") or self.env.get("TMPDIR") or "/tmp"
        return Path(base) / "ray" / "ray_current_cluster"

    def address_file_names_head(self) -> bool:
        """Whether the address file names this head (by its GCS port: `ray start` writes the node's IP)."""
        try:
            named = self.address_file().read_text().strip()
        except OSError:
            return False
        return bool(self.gcs) and named.rsplit(":", 1)[-1] == self.gcs.rsplit(":", 1)[-1]

    def _forget_address(self) -> None:
        """Remove the head's address file if it still names this (stopped) head.

        Only `ray stop` removes it, and a head stopped by signal leaves it naming a dead GCS: a bare
        `ray status` on this machine then fails on that address until someone runs `ray stop`. A file
        another cluster has written since is left alone.
        """
        if self.address_file_names_head():
            self.address_file().unlink(missing_ok=True)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, as `ray list nodes` reports them (through the dashboard)."""
        for _ in range(30):  # the state API answers a few seconds after the dashboard does
            out = self.ray("list", "nodes", "--address", self.url, "--format=json", "--filter", "state=ALIVE")
            try:
                return json.loads(out.stdout)
            except json.JSONDecodeError:
                time.sleep(1)
        raise AssertionError(f"`ray list nodes` failed: {out.stdout[-1000:]} {out.stderr[-2000:]}")

    def ray(self, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    def submit(self, *job: str) -> str:
        """`ray job submit --working-dir . --no-wait -- python JOB...`, as a user types it; returns the job id."""
        env = ["--runtime-env-json", json.dumps(self.runtime_env)] if self.runtime_env else []
        done = self.ray(
            "job", "submit", "--address", self.url, "--working-dir", str(REPO), *env, "--no-wait", "--", "python", *job
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return re.search(r"(raysubmit_\w+)", done.stdout + done.stderr).group(1)

    def status(self, job_id: str) -> str:
        st = self.ray("job", "status", "--address", self.url, job_id)
        return st.stdout + st.stderr

    def wait(self, job_id: str, timeout_s: float = 400) -> tuple[str, str]:
        """(final status text, logs) of a job."""
        deadline, status = time.time() + timeout_s, ""
        while time.time() < deadline:
            status = self.status(job_id)
            if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):  # "Job 'ID' succeeded" in 2.60
                break
            time.sleep(3)
        return status, self.logs_of(job_id)

    def logs_of(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.url, job_id).stdout

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, *args: str, env: dict | None = None) -> None:
        self.nodes[name] = subprocess.Popen(
            # Every node's dashboard agent on a port of its own: Ray's default (52365) is taken by
            # any other Ray on this machine (the suite's embedded one), and a node whose agent cannot
            # bind it has no job agent ("No available agent to submit job").
            [str(BIN / "ray"), "start", "--block", "--dashboard-agent-listen-port=0", *args],
            env={**self.env, **(env or {})},
            start_new_session=True,
            stdout=open(self.logs / f"{name}.log", "w"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
        )

    def _check_alive(self, name: str) -> None:
        assert self.nodes[name].poll() is None, self.log(name)[-3000:]


def autoscaling_config(gcs: str, head_cpus: int, worker_types: dict, head_node_id: str) -> dict:
    """A cluster config for Ray's fake multi-node provider (nodes are local `ray` processes).

    The provider is named as an external module: Ray 2.60's wheel lacks the fake provider's
    defaults file (example.yaml) that `type: fake_multinode` would load.
    """
    module = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
    return {
        "cluster_name": "apo-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {
            "type": "external",
            "module": module,
            "gcs_address": gcs,
            "launch_multiple": True,
            "head_node_id": head_node_id,
        },
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
    }
