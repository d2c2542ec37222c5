"""The Stage 2 memory planner: parameter counts, the per-component formulas, the verdict and `apo-ray plan`."""

from __future__ import annotations

import pytest

from apo_ray import cli
from apo_ray.config import load_config
from apo_ray.errors import ConfigError
from apo_ray.memory import KNOWN_SHAPES, ModelShape, check_fits, learner_bytes, plan_memory


@pytest.mark.parametrize(
    "name, billions",
    [
        ("Qwen/Qwen2.5-0.5B", 0.494),
        ("Qwen/Qwen2.5-1.5B", 1.544),
        ("Qwen/Qwen2.5-3B", 3.086),
        ("Qwen/Qwen2.5-7B", 7.616),
    ],
)
def test_parameter_counts_match_the_published_ones(name, billions):
    # Published (model cards): 0.49 B, 1.54 B, 3.09 B, 7.61 B.
    assert KNOWN_SHAPES[name].params / 1e9 == pytest.approx(billions, rel=2e-3)


def test_zero_stages_shard_what_the_zero_paper_says():
    shape = ModelShape(hidden=1024, layers=4, intermediate=4096, vocab=1000, heads=16, kv_heads=4, tied=True)
    P = shape.params
    for z, W in ((0, 4), (1, 4), (2, 4), (3, 4)):
        cfg = load_config("demo", [f"train.zero_stage={z}", "train.num_learners=4", "train.micro_batch_size=16"])
        b = learner_bytes(shape, cfg, "bfloat16")
        assert b["weights"] == 2 * P / (W if z == 3 else 1)
        assert b["master_weights"] == 4 * P / (W if z >= 1 else 1)
        assert b["adam_moments"] == 8 * P / (W if z >= 1 else 1)
        assert b["gradients"] == 4 * P / (W if z >= 2 else 1) + (2 * P if z < 2 else 0)
    fp32 = learner_bytes(shape, load_config("demo"), "float32")  # CPU: fp32 weights are the master copy
    assert fp32["weights"] == 4 * P and fp32["master_weights"] == 0 and fp32["gradients"] == 4 * P


def test_gradient_checkpointing_keeps_layer_inputs_only():
    shape = KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"]
    plain = learner_bytes(shape, load_config("gsm8k_qwen2.5_1.5b"), "bfloat16")["activations"]
    ckpt = learner_bytes(shape, load_config("gsm8k_qwen2.5_1.5b", ["train.gradient_checkpointing=true"]), "bfloat16")
    assert ckpt["activations"] < plain / 5


def test_too_big_is_refused_naming_the_phase_and_keys():
    cfg = load_config("gsm8k_qwen2.5_7b", ["engine.gpu_memory_utilization=0.9"])
    plan = plan_memory(cfg, KNOWN_SHAPES["Qwen/Qwen2.5-7B"], gpu_gib=80.0)
    assert not plan.fits and "generate phase" in plan.advice
    with pytest.raises(ConfigError, match=r"^config key 'train.micro_batch_size': Stage 2 needs ~\d+.*generate phase"):
        check_fits(cfg, "Qwen/Qwen2.5-7B", 80.0, "bfloat16")
    small = plan_memory(load_config("gsm8k_qwen2.5_7b"), KNOWN_SHAPES["Qwen/Qwen2.5-7B"], gpu_gib=44.5)
    assert not small.fits  # an L40S (48 GB) cannot hold it colocated: cluster/aws.yaml says so


def test_separate_placement_leaves_vllm_out_of_the_learner_gpu():
    cfg = load_config("gsm8k_qwen2.5_7b", ["train.placement=separate"])
    plan = plan_memory(cfg, KNOWN_SHAPES["Qwen/Qwen2.5-7B"], gpu_gib=80.0)
    assert set(plan.phases) == {"train", "sync"} and plan.peak_gib < plan.resident_gib + 10


def test_apo_ray_plan_prints_the_table_and_exits_by_verdict(capsys):
    assert cli.main(["plan", "--config", "gsm8k_qwen2.5_1.5b"]) == 0
    out = capsys.readouterr().out
    assert "1.54 B parameters" in out and "phase generate" in out and ": fits" in out
    assert cli.main(["plan", "--config", "gsm8k_qwen2.5_7b", "--gpu-gib", "40"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
