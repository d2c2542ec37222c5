"""Integration fixtures: one embedded Ray for the in-process tests, configs on the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by in-process integration tests (workers see tests/integration)."""
    import ray

    if not ray.is_initialized():
        path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = f"{HERE}{os.pathsep}{path}" if path else str(HERE)
        ray.init(
            address="local",
            num_cpus=6,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
        )
    yield ray
    ray.shutdown()
