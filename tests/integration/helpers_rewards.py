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


# ---------------------------------------------------------------- gates for tests/integration/test_one_command.py
# Stage 1 rewards that hold a Stage 1 sampler until the pipeline's Stage 2 has reached a point, so a
# test can show that Stage 2 got there while Stage 1 was still running (a pipeline that started Stage
# 2 only after Stage 1 would keep the gate shut until GATE_TIMEOUT_S, and its test would fail).

GATE_TIMEOUT_S = 240.0
STREAM_GATE_CALLS = 256  # the test's first shard: vstar.shard_size=64 prompts x vstar.num_samples=4
_calls = {"n": 0, "open": False}


def _wait_for_feed(event: str) -> None:
    """In a Ray actor (a Stage 1 sampler), wait until the pipeline's feed has seen `event`."""
    import ray

    if _calls["open"] or ray.get_runtime_context().get_actor_id() is None:  # the driver's reward check
        return
    deadline = time.time() + GATE_TIMEOUT_S
    while time.time() < deadline:
        names = [n for n in ray.util.list_named_actors() if n.startswith("apo-ray-feed-")]
        if names:
            times = ray.get(ray.get_actor(names[0]).times.remote())
            if (event == "ready" and times["ready"]) or (event == "partial_step" and times["partial_steps"]):
                break
        time.sleep(0.2)
    _calls["open"] = True


def arith_after_stage2_ready(completion: str, answer: str) -> float:
    """The arith reward; a Stage 1 sampler's first call waits until Stage 2's worker is ready."""
    _wait_for_feed("ready")
    return _arith(completion, answer)


def arith_after_a_streamed_step(completion: str, answer: str) -> float:
    """The arith reward; a Stage 1 sampler's calls after its first shard wait until Stage 2 has
    taken a step on the V* of the shards written so far."""
    _calls["n"] += 1
    if _calls["n"] > STREAM_GATE_CALLS:
        _wait_for_feed("partial_step")
    return _arith(completion, answer)


def flaky_after_a_streamed_step(completion: str, answer: str) -> float:
    """`arith_after_a_streamed_step`, but raising on answers ending in 7 (~10 % of the completions:
    Stage 1's reward-error check fails at its end, after Stage 2 has trained on streamed shards)."""
    if answer.endswith("7"):
        raise ValueError(f"flaky reward refuses answer {answer}")
    return arith_after_a_streamed_step(completion, answer)
