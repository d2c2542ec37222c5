"""Scoring completions: the one policy for a reward function that raises.

A raising reward scores 0 and is counted; the first error is logged once, with where it
happened. Stage 1, Stage 2, the in-training eval and eval all score through `RewardScorer`:

    scorer = RewardScorer(get_reward_fn(name), name)
    r = scorer("82", "82", where="prompt arith-1f3a")   # 1.0
    scorer.errors, scorer.first_error                   # 0, None
"""

from __future__ import annotations

import logging

from apo_ray.rewards.registry import RewardFn

log = logging.getLogger("apo_ray.rewards")


def score(fn: RewardFn, completion: str, answer: str) -> tuple[float, str | None]:
    """(reward, None), or (0.0, "ErrorType: message") when `fn` raises."""
    try:
        return float(fn(completion, answer)), None
    except Exception as e:  # noqa: BLE001 - user code on untrusted text: any error is scored 0 and reported
        return 0.0, f"{type(e).__name__}: {e}"


class RewardScorer:
    """A reward function with the error policy: count, score 0, log the first error once.

    Args:
        fn: `fn(completion, answer) -> float`.
        name: the reward's spec (reward.fn), named in the log line.
    """

    def __init__(self, fn: RewardFn, name: str):
        self.fn, self.name = fn, name
        self.errors = 0
        self.first_error: str | None = None

    def score(self, completion: str, answer: str, where: str = "") -> tuple[float, str | None]:
        """(reward, error or None); an error is counted and the first one logged."""
        reward, error = score(self.fn, completion, answer)
        if error is not None:
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{where}: {error}" if where else error
                log.warning("reward function %s raised (scored 0): %s", self.name, self.first_error)
        return reward, error

    def __call__(self, completion: str, answer: str, where: str = "") -> float:
        return self.score(completion, answer, where)[0]

    def reset(self) -> tuple[int, str | None]:
        """(errors, first error) since the last reset; starts counting afresh."""
        out = (self.errors, self.first_error)
        self.errors, self.first_error = 0, None
        return out
