"""The whole method in one command: Stage 1 (V* shards) then Stage 2 (A*-PO) in one driver on one
Ray cluster, Stage 2's learners and vLLM replicas starting up while Stage 1 samples; the same
outputs as jobs/vstar.py followed by jobs/train.py. pipeline.stream=true starts training on the
first complete V* shards (see the README for how that changes the data order).

Locally (an embedded Ray starts by itself):
    python jobs/pipeline.py --config demo [pipeline.stream=true] [key=value ...]
On a cluster:
    ray job submit --working-dir . -- python jobs/pipeline.py --config NAME_OR_YAML [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("pipeline"))
