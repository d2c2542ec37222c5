"""The whole A*-PO pipeline on one machine: tiny model, eval, Stage 1, Stage 2, eval again;
writes runs/demo/summary.json and runs/demo/report.png.

Locally (an embedded Ray starts by itself):
    python jobs/demo.py --config demo [key=value ...]
On a cluster:
    ray job submit --working-dir . -- python jobs/demo.py --config NAME_OR_YAML [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("demo"))
