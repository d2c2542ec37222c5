"""Benchmarks for the README: Stage 1 throughput, Stage 2 step time, A*-PO vs GRPO at equal wall-clock.

python jobs/bench.py stage1  --config demo
python jobs/bench.py stage2  --config demo [--steps 12]
python jobs/bench.py compare --config demo [--budget 240]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_ray.bench import main  # noqa: E402

if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    sys.exit(main())
