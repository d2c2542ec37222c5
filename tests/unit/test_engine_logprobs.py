"""Reading the sampled tokens' log-probs out of vLLM's flat log-prob lists."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from apo_ray.rollout.engine import sampled_logprobs


@dataclass
class _Flat:  # the fields of vllm.logprobs.FlatLogprobs that we read
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def test_the_sampled_entry_comes_first_at_each_position():
    # position 0: only the sampled token; position 1: sampled 7 first, then a top-k entry for 9
    flat = _Flat([0, 1], [1, 3], [5, 7, 9], [-0.5, -1.5, -0.1])
    assert sampled_logprobs([5, 7], flat) == [-0.5, -1.5]


def test_a_missing_or_mismatched_entry_raises():
    with pytest.raises(RuntimeError, match="no log-prob for sampled token 6"):
        sampled_logprobs([6], _Flat([0], [1], [5], [-0.5]))
    with pytest.raises(RuntimeError, match="1 log-probs for 2 tokens"):
        sampled_logprobs([5, 7], _Flat([0], [1], [5], [-0.5]))
