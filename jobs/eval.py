"""Evaluate a model directory or a training checkpoint: greedy accuracy, pass@k and KL to the
reference, through a pool of vLLM actors; writes a JSON report to eval.output_dir.

Locally (an embedded Ray starts by itself):
    python jobs/eval.py --config demo [key=value ...]
On a cluster:
    ray job submit --working-dir . -- python jobs/eval.py --config NAME_OR_YAML [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("eval"))
