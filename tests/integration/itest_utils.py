"""Helpers shared by integration tests (importable: pytest puts this directory on sys.path)."""

from __future__ import annotations

from pathlib import Path

from apo_ray.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


# The demo trains at lr 2.5e-7 so that its climb lasts minutes; the tests run tens of steps and were
# measured at 1e-4, where learning shows within them (a test's own train.lr still wins).
TEST_LR = "train.lr=1e-4"


def demo_config(*overrides: str) -> Config:
    """The demo config at the tests' lr (`TEST_LR`), then `overrides`."""
    return load_config("demo", [TEST_LR, *overrides])
