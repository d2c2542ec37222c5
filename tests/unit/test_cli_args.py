"""Command lines as the README and Makefile write them: overrides may come before or after options."""

from __future__ import annotations

import pytest

from apo_ray import bench, cli


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--config", "demo", "--budget", "120", "train.eval_every=25"],  # the Makefile's
        ["compare", "train.eval_every=25", "--config", "demo", "--budget", "120"],
        ["--budget", "120", "compare", "--config", "demo", "train.eval_every=25"],
    ],
)
def test_bench_overrides_anywhere(argv):
    args = bench.parse_args(argv)
    assert (args.which, args.config, args.budget, args.overrides) == ("compare", "demo", 120.0, ["train.eval_every=25"])


def test_bench_rejects_unknown_benchmark():
    with pytest.raises(SystemExit):
        bench.parse_args(["stage3"])


@pytest.mark.parametrize(
    "argv",
    [
        ["show-config", "--config", "demo", "train.lr=1e-5", "vstar.num_samples=4"],
        ["show-config", "train.lr=1e-5", "--config", "demo", "vstar.num_samples=4"],
    ],
)
def test_job_overrides_anywhere(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "lr: 1.0e-05" in out and "num_samples: 4" in out


def test_bench_parts_takes_its_repeats():
    args = bench.parse_args(["parts", "--repeats", "5", "--config", "demo", "sampling.max_tokens=16"])
    assert (args.which, args.repeats, args.overrides) == ("parts", 5, ["sampling.max_tokens=16"])


def test_bench_stage1_takes_its_rounds():
    args = bench.parse_args(["stage1", "--rounds", "3", "--config", "demo", "vstar.shard_size=64"])
    assert (args.which, args.rounds, args.overrides) == ("stage1", 3, ["vstar.shard_size=64"])
    assert bench.parse_args(["stage1"]).rounds == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["stage1", "--rounds", "0"])


def test_bench_json_names_the_ray_it_joined(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert bench.bench_command(["stage1", "--rounds", "3"]) == "python jobs/bench.py stage1 --rounds 3"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert bench.bench_command(["stage1"]) == "RAY_ADDRESS=auto python jobs/bench.py stage1"
