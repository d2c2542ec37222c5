"""Stage 2: A*-PO on-policy training (or the GRPO baseline, train.algo=grpo) with Ray Train
DeepSpeed learners and a colocated vLLM rollout actor that receives the new weights every step.

Locally (an embedded Ray starts by itself):
    python jobs/train.py --config demo [key=value ...]
On a cluster:
    ray job submit --working-dir . -- python jobs/train.py --config NAME_OR_YAML [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("train"))
