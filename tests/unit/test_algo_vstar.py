"""V* (Stage 1) against hand-derived numbers: binary rewards, k of N = 8 correct."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apo_ray.algo import vstar

N = 8
# beta1 = 0.5: V* = 0.5 * ln((8 - k + k e^2) / 8) = 0.5 * ln(1 - k/8 + (k/8) e^2), k = 0..8 (paper defaults N = 8, beta1 = 0.5).
PAPER_TABLE = [0.0, 0.294, 0.477, 0.611, 0.717, 0.804, 0.878, 0.943, 1.0]


def k_of_n_rewards() -> list[list[float]]:
    """Row k has k ones then 8 - k zeros, k = 0..8."""
    return [[1.0] * k + [0.0] * (N - k) for k in range(N + 1)]


def test_paper_table_beta1_half() -> None:
    v = vstar(torch.tensor(k_of_n_rewards()), 0.5)
    assert v.dtype == torch.float64
    closed = [0.5 * math.log(1 - k / 8 + (k / 8) * math.e**2) for k in range(N + 1)]
    for k in range(N + 1):
        assert abs(v[k].item() - PAPER_TABLE[k]) < 1e-3, k
        assert abs(v[k].item() - closed[k]) < 1e-12, k


def test_order_of_samples_does_not_matter() -> None:
    # 3 of 8 correct, in two different positions: same V* (0.611).
    a = vstar([[1, 1, 1, 0, 0, 0, 0, 0]], 0.5)
    b = vstar([[0, 1, 0, 0, 1, 0, 0, 1]], 0.5)
    assert a[0] == pytest.approx(b[0], abs=1e-15)
    assert a[0] == pytest.approx(0.611, abs=1e-3)


def test_beta1_inf_is_the_mean() -> None:
    v = vstar(torch.tensor(k_of_n_rewards()), math.inf)
    assert torch.allclose(v, torch.arange(N + 1, dtype=torch.float64) / 8, atol=1e-15, rtol=0)


def test_small_beta1_tends_to_max_without_overflow() -> None:
    # beta1 = 1e-3: r / beta1 = 1000 (exp overflows float64 at ~709).
    # k >= 1: V* = 1e-3 * (1000 + ln(k + (8 - k) e^-1000) - ln 8) = 1 + 1e-3 * ln(k / 8); k = 0: 0.
    beta1 = 1e-3
    v = vstar(torch.tensor(k_of_n_rewards()), beta1)
    assert torch.isfinite(v).all()
    assert v[0].item() == 0.0
    for k in range(1, N + 1):
        assert v[k].item() == pytest.approx(1 + beta1 * math.log(k / 8), abs=1e-12)
        assert 1.0 - beta1 * math.log(8) - 1e-12 <= v[k].item() <= 1.0 + 1e-12  # within beta1 ln N of the max
    v_np = vstar(np.array(k_of_n_rewards()), beta1)
    assert np.isfinite(v_np).all()
    np.testing.assert_allclose(v_np, v.numpy(), atol=1e-12, rtol=0)


def test_monotone_in_beta1() -> None:
    # 1 of 8 correct: from max (1) at beta1 -> 0 down to the mean (1/8) at beta1 = inf.
    row = [[1, 0, 0, 0, 0, 0, 0, 0]]
    values = [vstar(row, b)[0] for b in (1e-3, 0.1, 0.5, 1.0, 10.0, math.inf)]
    assert all(x > y for x, y in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1 / 8, abs=1e-15)


def test_numpy_list_and_torch_agree() -> None:
    rows = [[0.0, 1.0, 1.0, 0.0], [0.25, -1.0, 3.0, 0.5]]
    v_list = vstar(rows, 0.5)
    v_np = vstar(np.array(rows, dtype=np.float32), 0.5)
    v_t = vstar(torch.tensor(rows, dtype=torch.float32), 0.5)
    assert isinstance(v_list, np.ndarray) and v_list.dtype == np.float64
    assert isinstance(v_np, np.ndarray) and v_np.dtype == np.float64
    assert isinstance(v_t, torch.Tensor) and v_t.dtype == torch.float64
    # Row 0: 2 of 4 correct -> 0.5 * ln((2 + 2 e^2) / 4) = 0.5 * ln((1 + e^2) / 2).
    assert v_list[0] == pytest.approx(0.5 * math.log((1 + math.e**2) / 2), abs=1e-12)
    np.testing.assert_allclose(v_list, v_np, atol=1e-12, rtol=0)
    np.testing.assert_allclose(v_list, v_t.numpy(), atol=1e-12, rtol=0)


def test_torch_input_is_not_part_of_a_graph() -> None:
    r = torch.tensor([[1.0, 0.0]], requires_grad=True)
    assert not vstar(r, 0.5).requires_grad


@pytest.mark.parametrize("beta1", [0.0, -0.5, math.nan, -math.inf])
def test_bad_beta1(beta1: float) -> None:
    with pytest.raises(ValueError, match="beta1"):
        vstar([[1.0, 0.0]], beta1)
    with pytest.raises(ValueError, match="beta1"):
        vstar(torch.tensor([[1.0, 0.0]]), beta1)


@pytest.mark.parametrize("rewards", [[1.0, 0.0], [[[1.0]]], [[], []]])
def test_bad_shapes(rewards: list) -> None:
    with pytest.raises(ValueError):
        vstar(rewards, 0.5)
    with pytest.raises(ValueError):
        vstar(torch.tensor(rewards), 0.5)


def test_stage1_sample_seeds_are_distinct_across_prompts_chunks_and_shards():
    from apo_ray.vstar.pipeline import call_seed

    n, shard_size, batch, shards = 8, 128, 48, 5
    seeds = []
    for shard in range(shards):
        for c0 in range(0, shard_size, batch):
            base = call_seed(3, shard, shard_size, c0, n)
            calls = min(batch, shard_size - c0)
            seeds += [base + i * n + j for i in range(calls) for j in range(n)]  # the engine's convention
    assert len(seeds) == len(set(seeds)) == shards * shard_size * n
    # The bug this replaces (seed + shard * shard_size + c0, demo shard_size 128): shard 1's first
    # prompt got seed 128, the stream of shard 0's prompt 16 (16 * n = 128).
    assert call_seed(0, 1, 128, 0, n) == 128 * n != call_seed(0, 0, 128, 0, n) + 16 * n
