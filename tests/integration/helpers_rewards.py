"""Reward functions used by the integration tests through reward.fn="helpers_rewards:NAME"."""

import os
import tempfile
import time
from pathlib import Path

from apo_ray.rewards import get_reward_fn

_arith = get_reward_fn("arith")


def flaky_arith(completion: str, answer: str) -> float:
    """The arith reward, except that it raises on every completion of prompts whose answer ends in 7."""
    if answer.endswith("7"):
        raise ValueError(f"flaky reward refuses answer {answer}")
    return _arith(completion, answer)


def slow_arith(completion: str, answer: str) -> float:
    """The arith reward, slowed down so that a run can be interrupted part-way."""
    time.sleep(0.02)
    return _arith(completion, answer)


CRASH_STATE = Path(tempfile.gettempdir()) / "apo_ray_test_crash_once"


def crash_once_after_200_calls(completion: str, answer: str) -> float:
    """The arith reward; the 200th call ever (counted in CRASH_STATE) kills its process, once.

    Called inside a Ray Train worker, this is a real worker death in the middle of a step.
    """
    n = int(CRASH_STATE.read_text()) + 1 if CRASH_STATE.exists() else 1
    CRASH_STATE.write_text(str(n))
    if n == 200:
        os._exit(1)
    return _arith(completion, answer)


FIXED_FLAG = Path(tempfile.gettempdir()) / "apo_ray_test_reward_fixed"


def flaky_until_fixed(completion: str, answer: str) -> float:
    """`flaky_arith` until FIXED_FLAG exists: a reward whose code the user then fixes (same name)."""
    if answer.endswith("7") and not FIXED_FLAG.exists():
        raise ValueError(f"flaky reward refuses answer {answer}")
    return _arith(completion, answer)
