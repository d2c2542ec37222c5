"""The one scoring policy (`RewardScorer`): a raising reward scores 0, is counted, the first error is logged once."""

from __future__ import annotations

import logging

from apo_ray.rewards import RewardScorer, arith_reward, score


def _flaky(completion: str, answer: str) -> float:
    if completion == "boom":
        raise RuntimeError("bad input")
    return 1.0 if completion == answer else 0.0


def test_score_returns_the_reward_or_zero_and_the_error():
    assert score(arith_reward, "82", "82") == (1.0, None)
    assert score(_flaky, "boom", "1") == (0.0, "RuntimeError: bad input")


def test_scorer_counts_errors_and_logs_the_first_once(caplog):
    scorer = RewardScorer(_flaky, "mod:_flaky")
    with caplog.at_level(logging.WARNING, logger="apo_ray.rewards"):
        rewards = [scorer(c, "1", where=f"prompt p{i}") for i, c in enumerate(["1", "boom", "0", "boom"])]
    assert rewards == [1.0, 0.0, 0.0, 0.0]
    assert scorer.errors == 2 and scorer.first_error == "prompt p1: RuntimeError: bad input"
    assert [r.getMessage() for r in caplog.records] == [
        "reward function mod:_flaky raised (scored 0): prompt p1: RuntimeError: bad input"
    ]
    assert scorer.reset() == (2, "prompt p1: RuntimeError: bad input")
    assert (scorer.errors, scorer.first_error) == (0, None)
