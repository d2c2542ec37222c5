"""Helpers shared by integration tests (importable: pytest puts this directory on sys.path)."""

from __future__ import annotations

from pathlib import Path

from apo_ray.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def demo_config(*overrides: str) -> Config:
    return load_config("demo", list(overrides))
