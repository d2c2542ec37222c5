"""The comparison's time-to-target rule (pure)."""

from __future__ import annotations

from apo_ray.bench import seconds_to_target

CURVE = [
    {"seconds": 0.0, "step": 0, "accuracy": 0.50},  # the untrained model
    {"seconds": 44.0, "step": 25, "accuracy": 0.64},
    {"seconds": 48.0, "step": 50, "accuracy": 0.68},
    {"seconds": 52.0, "step": 75, "accuracy": 0.66},
]


def test_first_trained_point_at_or_above_target():
    assert seconds_to_target(CURVE, 0.66) == 48.0
    assert seconds_to_target(CURVE, 0.68) == 48.0
    assert seconds_to_target(CURVE, 0.64) == 44.0


def test_never_reached():
    assert seconds_to_target(CURVE, 0.69) is None


def test_untrained_point_never_counts():
    assert seconds_to_target(CURVE, 0.40) == 44.0


def test_shift_moves_trained_points():
    assert seconds_to_target(CURVE, 0.66, shift=-32.0) == 16.0
