"""Stage 1: sample N completions per prompt from the reference policy on a pool of vLLM actors
(Ray Data), score them, and write V*(x) = beta1 * log mean exp(r / beta1) as parquet shards to
vstar.output_dir.

Locally (an embedded Ray starts by itself):
    python jobs/vstar.py --config demo [key=value ...]
On a cluster:
    ray job submit --working-dir . -- python jobs/vstar.py --config NAME_OR_YAML [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("vstar"))
