"""The comparison's statistics (pure): time to a target, bands over seeds, the lr choice."""

from __future__ import annotations

import pytest

from apo_ray.compare import accuracy_at, band, curve_mean, first_reach, mean_se, summarize, target_accuracy

CURVE = [
    {"seconds": 0.0, "work_seconds": 0.0, "step": 0, "accuracy": 0.50, "kl": 0.0},  # the untrained model
    {"seconds": 44.0, "work_seconds": 12.0, "step": 25, "accuracy": 0.64, "kl": 0.2},
    {"seconds": 48.0, "work_seconds": 16.0, "step": 50, "accuracy": 0.68, "kl": 0.3},
    {"seconds": 52.0, "work_seconds": 20.0, "step": 75, "accuracy": 0.66, "kl": 0.4},
]


def test_first_trained_point_at_or_above_target():
    assert first_reach(CURVE, 0.66)["seconds"] == 48.0
    assert first_reach(CURVE, 0.64)["seconds"] == 44.0
    assert first_reach(CURVE, 0.69) is None
    assert first_reach(CURVE, 0.40)["seconds"] == 44.0  # the untrained point never counts


def test_accuracy_is_a_step_function_of_time():
    assert accuracy_at(CURVE, 10.0) == 0.50 and accuracy_at(CURVE, 44.0) == 0.64 and accuracy_at(CURVE, 60.0) == 0.66
    assert accuracy_at(CURVE, 13.0, key="work_seconds") == 0.64


def test_mean_and_standard_error():
    assert mean_se([2.0]) == (2.0, 0.0)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / 3**0.5)
    assert band([CURVE, CURVE], [0.0, 50.0]) == [(0.5, 0.0), (0.68, 0.0)]


def test_the_lr_choice_rewards_reaching_accuracy_early():
    late = [CURVE[0], {**CURVE[1], "accuracy": 0.50}, {**CURVE[2], "accuracy": 0.50}, CURVE[3]]
    assert curve_mean(CURVE) > curve_mean(late)


def test_summary_times_each_algorithm_to_a_target_every_run_reaches():
    assert target_accuracy(0.5, [0.66, 0.70]) == pytest.approx(0.5 + 0.9 * 0.16)
    grpo = [{**p, "work_seconds": p["seconds"]} for p in CURVE]
    runs = [
        {"algo": "astar_po", "seed": 0, "curve": CURVE},
        {"algo": "astar_po", "seed": 1, "curve": CURVE},
        {"algo": "grpo", "seed": 0, "curve": grpo},
        {"algo": "grpo", "seed": 1, "curve": grpo},
    ]
    s = summarize(runs, 0.5)
    assert s["target_accuracy"] == pytest.approx(0.644)  # finals 0.66: 0.5 + 0.9 * 0.16
    assert s["astar_po"]["reached"] == 2 and s["astar_po"]["seconds_to_target_mean_se"] == (48.0, 0.0)
    assert s["astar_po"]["work_seconds_to_target_mean_se"] == (16.0, 0.0)
    assert s["astar_po"]["kl_at_target_mean_se"] == (0.3, 0.0)
    assert s["time_ratio_astar_over_grpo"] == 1.0 and s["time_ratio_astar_over_grpo_stage1_work_only"] == 16.0 / 48.0
