"""Integration fixtures: one embedded Ray for the in-process tests, configs on the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import moto_server

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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on localhost, with bucket s3_server.BUCKET; the AWS_* variables that point at it
    are set in this process's environment (the driver's, as a user exports them) while it runs."""
    with moto_server(tmp_path_factory.mktemp("moto")) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
