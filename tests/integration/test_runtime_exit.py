"""An embedded Ray: apo-ray starts it without idle workers ahead of need, its workers find their own
cluster (not the one a stale /tmp/ray/ray_current_cluster names), and it stops Ray's autoscaler
monitor ahead of Ray's own shutdown (which would otherwise wait 1 s for it); the job still leaves no
Ray process behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

_JOB = """
import json
import time
import psutil
import ray
from ray._private import ray_constants, services
from ray._private import worker
from apo_ray.config import ResourcesConfig
from apo_ray import runtime
from apo_ray.runtime import init_ray, stop_monitor_first

assert init_ray(ResourcesConfig(num_cpus=1)) == "local"
node = worker._global_node
pids = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
# With Ray's default the raylet starts idle workers within ~1 s of the driver connecting.
raylet = psutil.Process(pids[ray_constants.PROCESS_TYPE_RAYLET][0])
workers = set()
for _ in range(15):
    workers |= {p.pid for p in raylet.children() if p.name() == "ray::IDLE"}  # a worker with no task yet
    time.sleep(0.2)

# How Ray's state API in a worker finds the cluster (Ray Train's PlacementGroupCleaner asks it whether
# the controller is alive): in an actor with an env of its own, and in a detached actor it creates.
class Child:
    def where(self):
        return services.canonicalize_bootstrap_address_or_die(None)

@ray.remote(num_cpus=0)
class Parent:
    def where(self):
        child = ray.remote(num_cpus=0)(Child).options(lifetime="detached").remote()
        return [services.canonicalize_bootstrap_address_or_die(None), ray.get(child.where.remote())]

found = ray.get(Parent.options(runtime_env={"env_vars": {"X": "1"}}).remote().where.remote())
monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
stop_monitor_first()
print("JOB " + json.dumps({
    "pids": pids,
    "monitor_exit": monitor.poll(),
    "gcs_alive_after": len(ray.nodes()),
    "exit_hook": runtime._exit_hook is stop_monitor_first,
    "idle_workers": len(workers),
    "gcs": ray.get_runtime_context().gcs_address,
    "found": found,
}))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(") ", 1)[1][0] != "Z"


def test_embedded_ray_is_found_by_its_workers_starts_no_idle_workers_and_stops_its_monitor_first():
    # Ray's temp dir of its own, holding what `ray start` leaves when its cluster is killed, not
    # stopped: the address file of a GCS that is gone. (Short: Ray's socket paths live under it.)
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    os.makedirs(f"{tmp}/ray")
    with open(f"{tmp}/ray/ray_current_cluster", "w") as f:
        f.write("127.0.0.1:1")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", _JOB], env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("JOB "))[4:])
    assert res["found"] == [res["gcs"], res["gcs"]]  # not the stale 127.0.0.1:1
    assert res["idle_workers"] == 0  # none started ahead of need: every apo-ray actor has its own env
    assert res["exit_hook"]  # registered by init_ray, so a job's plain exit runs it
    assert res["monitor_exit"] is not None  # killed by the hook, with the GCS still up:
    assert res["gcs_alive_after"] == 1
    # SIGKILL: the monitor's SIGTERM handler would have told the driver the autoscaler failed.
    assert "autoscaler failed" not in done.stdout + done.stderr
    left = [(kind, pid) for kind, pids in res["pids"].items() for pid in pids if _alive(pid)]
    assert not left, left
