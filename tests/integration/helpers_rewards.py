"""Reward functions used by the integration tests through reward.fn="helpers_rewards:NAME"."""

import time

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
