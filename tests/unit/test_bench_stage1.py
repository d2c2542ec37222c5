"""The Stage 1 bench's arithmetic (pure): one round's ratios, and the medians over rounds."""

from __future__ import annotations

import pytest

from apo_ray.bench import _stage1_round, stage1_summary

PIPE = {"process_s": 20.0, "wall_s": 18.0, "shard_s": 8.0, "tokens": 1000}
BARE = {"process_s": 16.0, "import_s": 5.0, "load_s": 2.0, "generate_s": 6.0, "tokens": 1000}


def test_a_round_divides_the_pipelines_tokens_per_second_by_the_bare_scripts():
    r = _stage1_round(PIPE, BARE, first="bare")
    assert r["ratio_processes"] == pytest.approx(16.0 / 20.0)  # same tokens: the inverse of the times
    assert r["ratio_in_actor_steady_state"] == pytest.approx(6.0 / 8.0)
    assert (r["first"], r["pipeline_tokens"], r["bare_generate_s"]) == ("bare", 1000, 6.0)
    more = _stage1_round({**PIPE, "tokens": 1100}, BARE, first="pipeline")  # samples differ a little
    assert more["ratio_processes"] == pytest.approx(1100 / 20.0 / (1000 / 16.0))


def test_rounds_are_summarised_by_their_medians_and_kept():
    rounds = [
        _stage1_round({**PIPE, "process_s": t}, BARE, first=f)
        for t, f in ((20.0, "pipeline"), (32.0, "bare"), (16.0, "pipeline"))
    ]
    s = stage1_summary(rounds)
    assert s["pipeline_process_s"] == 20.0 and s["bare_process_s"] == 16.0
    assert s["ratio_processes"] == pytest.approx(0.8)  # the median of 0.8, 0.5, 1.0
    assert s["ratio_processes_per_round"] == pytest.approx([0.8, 0.5, 1.0])
    assert s["rounds"] == rounds and "first" not in s
    one = stage1_summary(rounds[:1])  # one round: its own figures, as before rounds existed
    assert {k: one[k] for k in rounds[0] if k != "first"} == {k: v for k, v in rounds[0].items() if k != "first"}
    with pytest.raises(ValueError, match="no rounds"):
        stage1_summary([])


def test_the_json_names_the_ray_the_job_would_join(monkeypatch):
    from apo_ray.bench import _ray_in_use
    from apo_ray.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _ray_in_use(load_config("demo", [])) == "an embedded Ray it starts and stops"
    assert _ray_in_use(load_config("demo", ["resources.address=auto"])) == "the running Ray at auto"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert _ray_in_use(load_config("demo", [])) == "the running Ray at 127.0.0.1:6379"
