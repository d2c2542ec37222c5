"""jobs/gpu_check.py in its reduced CPU mode: it runs without Ray and vLLM and all its checks pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from itest_utils import REPO

pytestmark = pytest.mark.integration


def test_gpu_check_cpu_mode_runs_without_ray_or_vllm(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["imported_ray_or_vllm"] == []
    for model in report["models"].values():
        assert [s["zero"] for s in model["steps"]] == [2, 3]
        assert all(s["astar_po_finite"] and s["grpo_finite"] for s in model["steps"])
        assert model["zero3_gather"]["ok"]
    assert "all checks passed: True" in done.stdout
