"""The sweep's pure parts: its points, the parameter count, the floor's V* batch under the KV budget."""

from __future__ import annotations

import pytest

from apo_ray.config import load_config
from apo_ray.sweep import KV_BUDGET_BYTES, LENGTHS, SIZES, floor_vstar_batch, param_count, sweep_points


def test_points_are_a_size_line_and_a_length_line_without_repeats():
    pts = sweep_points()
    assert len(pts) == len(set(pts)) == len(SIZES) + len(LENGTHS) - 1  # (4M, 8) is on both lines
    assert [n for _, n in pts[: len(SIZES)]] == [8] * len(SIZES)


@pytest.mark.parametrize("label", [label for label, recipe in SIZES if recipe is not None][:2])
def test_param_count_matches_the_model(label):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    r = dict(SIZES)[label]
    cfg = dict(r, vocab_size=258, num_key_value_heads=1, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_floor_vstar_batch_shrinks_under_the_kv_budget():
    cfg = load_config("demo", [])  # vstar.batch_size 128, N 8, 32 prompt tokens
    small = {"num_key_value_heads": 1, "hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}
    assert floor_vstar_batch(cfg, small, 8) == 128  # the demo keeps its batch
    big = {"num_key_value_heads": 1, "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12}
    b = floor_vstar_batch(cfg, big, 256)
    per_prompt = 8 * (32 + 256) * 12 * 2 * 1 * 64 * 4
    assert b * per_prompt <= KV_BUDGET_BYTES < (b + 1) * per_prompt
