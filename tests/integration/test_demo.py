"""A shortened `make demo`: the whole pipeline (eval, Stage 1, Stage 2, eval) writes its summary and picture."""

from __future__ import annotations

import json

import pytest
from itest_utils import demo_config

pytestmark = pytest.mark.integration


def test_short_demo_writes_summary_and_report(ray_session, tiny_model_dir, tmp_path):
    from apo_ray import demo

    run = tmp_path / "demo"
    cfg = demo_config(
        f"model.path={tiny_model_dir}",
        f"vstar.output_dir={run}/vstar",
        f"train.vstar_dir={run}/vstar",
        f"train.output_dir={run}/train",
        "train.num_steps=10",
        "train.eval_every=5",
        "data.arith.num_train=128",
        "data.arith.num_eval=50",
    )
    returned = demo.run(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    for key in ("accuracy_before", "accuracy_after", "kl_to_ref", "seconds"):
        assert isinstance(summary[key], float), key
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert summary["kl_to_ref"] > 0  # trained policy differs from the reference
    assert set(summary["stage_seconds"]) >= {"model", "eval_before", "stage1", "stage2", "eval_after", "total"}
    assert summary["train_steps"] == 10
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
