"""The parts bench's pure pieces: the median of timed calls after the warm-up, and the batch it times."""

from __future__ import annotations

from apo_ray.config import load_config
from apo_ray.parts import WARMUP, first_batch, timed


def test_timed_is_the_median_of_the_calls_after_the_warm_up():
    calls = []
    assert timed(lambda: calls.append(1), 5) >= 0.0
    assert len(calls) == WARMUP + 5


def test_first_batch_is_the_steps_prompts_with_a_fixed_vstar():
    cfg = load_config("demo", ["train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=8"])
    rows = first_batch(cfg)
    assert len(rows) == 8 and {r["vstar"] for r in rows} == {0.5}
    assert all(r["prompt"] and r["answer"] for r in rows)
