"""The tensor-parallel policy on a real Ray with fake GPUs: an engine actor with tp = 2 holds 2 GPUs.

Ray's GPUs are logical resources, so a CPU machine can declare `num_gpus=2`; the actor is
created with exactly the options `apo_ray.launch` gives every engine actor (Stage 1, eval,
a separate rollout replica). Runs in a subprocess: it needs its own Ray instance.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = r"""
import json, ray
from apo_ray.launch import engine_actor_options

ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)

@ray.remote
class Probe:
    def gpus(self):
        return [str(g) for g in ray.get_gpu_ids()]

opts = engine_actor_options("cuda", 2, cpus_per_actor=1.0)
probe = Probe.options(**opts).remote()
gpus = ray.get(probe.gpus.remote(), timeout=60)
print(json.dumps({"options": opts, "gpus": gpus, "gpus_left": ray.available_resources().get("GPU", 0.0)}))
ray.shutdown()
"""


def test_tp2_engine_actor_reserves_two_gpus():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["options"]["num_gpus"] == 2
    assert sorted(out["gpus"]) == ["0", "1"]  # the actor sees both GPUs it reserved
    assert out["gpus_left"] == 0.0  # and nothing is left for another engine
