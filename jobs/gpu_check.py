"""The GPU check: the learner side of Stage 2 on one bare GPU box (torch, transformers, deepspeed;
no Ray, no vLLM, no network), one table; see apo_ray/gpu_check.py.

    python jobs/gpu_check.py                 # CUDA, bf16, Qwen2.5-0.5B- and 1.5B-shaped random models
    python jobs/gpu_check.py --device cpu    # reduced: tiny shapes on the CPU
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, also when apo_ray is not installed

from apo_ray.gpu_check import main  # noqa: E402

if __name__ == "__main__":  # the IPC check spawns a consumer process
    sys.exit(main())
