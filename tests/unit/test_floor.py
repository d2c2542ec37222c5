"""The floor's pure parts: cutting HF generate's output into responses; the bench's mean of two floors."""

from __future__ import annotations

import pytest
import torch

from apo_ray.floor import split_responses

EOS, PAD = 256, 257


def test_responses_stop_after_the_first_eos_and_keep_it():
    # 2 prompt columns (left-padded), then 4 new tokens; row 1 stopped early and was padded
    out_BT = torch.tensor(
        [
            [PAD, 7, 49, 50, EOS, PAD],
            [5, 7, 49, EOS, PAD, PAD],
            [5, 7, 49, 50, 51, 52],  # hit max_new_tokens: no EOS
            [PAD, 7, EOS, 49, EOS, PAD],  # only the first EOS counts
        ]
    )
    assert split_responses(out_BT, 2, EOS) == [[49, 50, EOS], [49, EOS], [49, 50, 51, 52], [EOS]]


def test_no_new_tokens():
    assert split_responses(torch.tensor([[1, 2], [3, 4]]), 2, EOS) == [[], []]


def test_the_floor_refuses_settings_it_does_not_implement():
    import pytest

    from apo_ray.config import load_config
    from apo_ray.errors import ConfigError
    from apo_ray.floor import check_floor_config

    check_floor_config(load_config("demo"))
    for override, key in [
        ("train.mini_batch_size=32 train.micro_batch_size=32", "train.mini_batch_size"),
        ("train.warmup_steps=5", "train.warmup_steps"),
        ("train.entropy_coef=0.01", "train.entropy_coef"),
        ("model.dtype=bfloat16", "model.dtype"),
    ]:
        with pytest.raises(ConfigError, match=rf"^config key '{key}'"):
            check_floor_config(load_config("demo", override.split()))


def test_the_bench_divides_by_the_mean_of_the_floors_on_either_side():
    from apo_ray.bench import _bracket

    before = {
        "threads": 2,
        "start_s": 1.0,
        "step": {"step_s": 0.040, "response_len": 7.0},
        "vstar_pass": {"prompts": 8},
    }
    after = {"threads": 2, "start_s": 3.0, "step": {"step_s": 0.050, "response_len": 7.0}, "vstar_pass": {"prompts": 8}}
    mid = _bracket(before, after)
    assert mid["step"]["step_s"] == pytest.approx(0.045) and mid["start_s"] == 2.0
    assert mid["threads"] == 2 and mid["vstar_pass"] == {"prompts": 8} and mid["step"]["response_len"] == 7.0
