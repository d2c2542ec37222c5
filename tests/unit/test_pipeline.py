"""The one-command pipeline's pure parts: the prompt handover to Stage 2's workers (with and without
the stream), the stream's data order, the pipeline's own config checks and its resource sum."""

from __future__ import annotations

import threading
import time

import pytest

from apo_ray.config import load_config
from apo_ray.errors import ConfigError, DataError
from apo_ray.pipeline import check_config, pipeline_resources, pool_cap
from apo_ray.runtime import add_resources
from apo_ray.train.data import VStarReader, batch_indices, stream_batch_indices
from apo_ray.train.feed import PipelineStopped, PromptFeed, StepPrompts


def _prompts(n: int, start: int = 0) -> list[dict]:
    return [
        {"prompt_id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "vstar": i / 100} for i in range(start, n)
    ]


# ---------------------------------------------------------------- the stream's data order


def test_a_streamed_step_draws_distinct_prompts_that_have_vstar():
    for step in range(20):
        idx = stream_batch_indices(num_available=10, batch_size=8, step=step, seed=3)
        assert len(idx) == 8 and len(set(idx)) == 8 and all(0 <= i < 10 for i in idx)


def test_a_streamed_step_is_a_pure_function_of_seed_step_and_count():
    assert stream_batch_indices(50, 8, 4, seed=0) == stream_batch_indices(50, 8, 4, seed=0)
    draws = {tuple(stream_batch_indices(50, 8, step, seed=0)) for step in range(10)}
    assert len(draws) == 10  # another step, another draw
    assert stream_batch_indices(50, 8, 4, seed=0) != stream_batch_indices(50, 8, 4, seed=1)


def test_a_streamed_step_never_draws_more_than_exist():
    with pytest.raises(ValueError, match="cannot fill a step"):
        stream_batch_indices(num_available=5, batch_size=8, step=0, seed=0)


def test_streamed_shards_are_checked_one_by_one_and_a_prompt_in_two_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, ids, v in (("a.parquet", ["p0", "p1"], [0.5, 0.25]), ("b.parquet", ["p2", "p1"], [0.0, 0.25])):
        pq.write_table(pa.table({"prompt_id": ids, "vstar": v, "rewards": [[x] for x in v]}), tmp_path / name)
    pq.write_table(pa.table({"prompt_id": ["p3"], "vstar": [2.0], "rewards": [[1.0]]}), tmp_path / "c.parquet")
    reader = VStarReader(str(tmp_path))
    assert reader.read("a.parquet") == {"p0": 0.5, "p1": 0.25}
    with pytest.raises(DataError, match=r"'p1' has V\* rows in both .*a.parquet and .*b.parquet"):
        reader.read("b.parquet")
    with pytest.raises(DataError, match=r"'p3' in .*c.parquet is 2.0, outside the range of its rewards"):
        reader.read("c.parquet")


# ---------------------------------------------------------------- the handover


def test_prompts_given_up_front_are_drawn_as_jobs_train_always_drew_them():
    prompts = _prompts(20)
    data = StepPrompts(prompts, batch_size=8, seed=5)
    data.wait()  # no feed: nothing to wait for
    for step in (1, 2, 3, 7):
        assert data.batch(step) == [prompts[i] for i in batch_indices(20, 8, step - 1, 5)]


def test_without_the_stream_a_worker_waits_for_every_prompt_then_draws_like_jobs_train():
    feed = PromptFeed()
    data = StepPrompts(feed=feed, batch_size=8, seed=5, poll_s=0.01)
    feed.add(_prompts(12))  # shards that landed: not used without the stream

    def finish_later():
        time.sleep(0.2)
        feed.finish(_prompts(20))

    threading.Thread(target=finish_later).start()
    t = time.time()
    data.wait()
    assert time.time() - t >= 0.15, "the worker must wait for finish"
    assert 0 in feed.times()["ready"] and feed.times()["ready"][0] <= feed.times()["finish"]
    given = StepPrompts(_prompts(20), batch_size=8, seed=5)
    assert [data.batch(s) for s in (1, 2, 3)] == [given.batch(s) for s in (1, 2, 3)]
    assert feed.times()["partial_steps"] == 0 and "first_step" in feed.times()


def test_the_stream_starts_on_one_batch_of_vstar_draws_from_what_landed_then_from_all():
    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=True, batch_size=4, seed=1, poll_s=0.01)
    feed.add(_prompts(3))
    started = threading.Event()
    waiter = threading.Thread(target=lambda: (data.wait(), started.set()))
    waiter.start()
    time.sleep(0.1)
    assert not started.is_set(), "3 prompts with V* cannot fill a step of 4"
    feed.add(_prompts(6, start=3))
    waiter.join(5)
    assert started.is_set()

    first = data.batch(1)
    assert data.available == 6 and {r["prompt_id"] for r in first} <= {f"p{i}" for i in range(6)}
    assert first == [_prompts(6)[i] for i in stream_batch_indices(6, 4, 0, seed=1)]
    feed.add(_prompts(10, start=6))  # another shard lands
    data.batch(2)
    assert data.available == 10

    feed.finish(list(reversed(_prompts(12))))  # the checked join (its own order) replaces the stream
    assert data.batch(3) == [list(reversed(_prompts(12)))[i] for i in batch_indices(12, 4, 2, seed=1)]
    assert data.complete and data.available == 12
    times = feed.times()
    assert times["partial_steps"] == 2 and times["last_partial_step"] == 2


def test_the_stream_starts_on_fewer_than_a_batch_when_that_is_every_prompt():
    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=True, batch_size=8, seed=0, poll_s=0.01)
    feed.add(_prompts(5))
    feed.finish(_prompts(5))
    data.wait()
    assert len(data.batch(1)) == 8  # an epoch-wise stream over 5 prompts, as jobs/train.py would


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_stage1_stops_the_waiting_workers(stream):
    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=stream, batch_size=4, seed=0, poll_s=0.01)
    feed.fail("Stage 1 failed: ConfigError: too many reward errors")
    with pytest.raises(RuntimeError, match="too many reward errors"):
        data.wait()


def test_a_failure_after_the_stream_started_stops_the_next_step():
    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=True, batch_size=4, seed=0, poll_s=0.01)
    feed.add(_prompts(8))
    data.wait()
    data.batch(1)
    feed.fail("Stage 1 failed: DataError: V* of prompt 'p9' is nan")
    with pytest.raises(RuntimeError, match="p9"):
        data.batch(2)


def test_step_prompts_takes_the_prompts_or_a_feed():
    with pytest.raises(ValueError):
        StepPrompts(batch_size=4, seed=0)
    with pytest.raises(ValueError):
        StepPrompts(_prompts(4), feed=PromptFeed(), batch_size=4, seed=0)


# ---------------------------------------------------------------- what the pipeline asks of a config


def test_the_pipeline_trains_on_the_vstar_its_stage1_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_config(load_config("demo"))  # runs/demo/vstar twice
    check_config(load_config("demo", [f"vstar.output_dir={tmp_path}/v", "train.vstar_dir=v/"]))  # one place
    with pytest.raises(ConfigError, match=r"^config key 'train.vstar_dir': 'elsewhere'.*vstar.output_dir"):
        check_config(load_config("demo", ["train.vstar_dir=elsewhere"]))
    with pytest.raises(ConfigError, match="config key 'train.vstar_dir'"):
        check_config(load_config("demo", ["vstar.output_dir=s3://b/v", "train.vstar_dir=s3://b/w"]))


def test_the_stream_needs_astar_po():
    check_config(load_config("demo", ["pipeline.stream=true"]))
    with pytest.raises(ConfigError, match=r"^config key 'pipeline.stream': train.algo=grpo"):
        check_config(load_config("demo", ["pipeline.stream=true", "train.algo=grpo"]))


def test_both_stages_must_fit_at_once():
    cfg = load_config("demo")  # 1 Stage 1 actor (1 CPU) + 1 learner with its replica (2 CPUs)
    assert pipeline_resources(cfg, "cpu", with_stage1=True) == {"CPU": 3.0}
    assert pipeline_resources(cfg, "cpu", with_stage1=False) == {"CPU": 2.0}  # Stage 1's V* is reused
    cfg = load_config(
        "demo", ["vstar.min_actors=2", "vstar.max_actors=4", "train.num_learners=2", "train.micro_batch_size=32"]
    )
    assert pipeline_resources(cfg, "cpu", with_stage1=True) == {"CPU": 6.0}
    cfg = load_config(
        "demo",
        [
            "vstar.min_actors=2",
            "vstar.max_actors=2",
            "train.num_learners=4",
            "train.micro_batch_size=16",
            "train.zero_stage=2",
        ],
    )
    assert pipeline_resources(cfg, "cuda", with_stage1=True) == {"CPU": 2.0 + 8.0, "GPU": 2.0 + 4.0}


def test_add_resources():
    assert add_resources({"CPU": 2.0, "GPU": 1.0}, {}, {"CPU": 1.0}) == {"CPU": 3.0, "GPU": 1.0}


# ---------------------------------------------------------------- ranks, the final save, the pool


def test_settle_waits_for_the_handover_and_stops_on_a_failure():
    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=True, batch_size=4, seed=0, poll_s=0.01)
    feed.add(_prompts(4))
    data.wait()
    data.batch(1)
    assert not data.complete
    threading.Timer(0.1, feed.finish, [_prompts(6)]).start()
    data.settle()  # blocks until the handover
    assert data.complete and len(data.prompts) == 6
    data.settle()  # then a no-op

    feed = PromptFeed()
    data = StepPrompts(feed=feed, stream=True, batch_size=4, seed=0, poll_s=0.01)
    feed.add(_prompts(4))
    data.wait()
    threading.Timer(0.1, feed.fail, ["Stage 1 failed: too many reward errors"]).start()
    with pytest.raises(PipelineStopped, match="too many reward errors"):
        data.settle()


def test_a_restarted_worker_sees_the_failure_before_it_sets_up():
    feed = PromptFeed()
    StepPrompts(feed=feed, batch_size=1, seed=0).check_failed()  # nothing yet
    feed.fail("Stage 1 failed")
    with pytest.raises(PipelineStopped, match="Stage 1 failed"):
        StepPrompts(feed=feed, batch_size=1, seed=0).check_failed()


def _two_ranks(monkeypatch):
    """min_over_ranks across two threads (each thread a rank), as the gloo collective computes it."""
    import apo_ray.train.dist as dist

    barrier, slots = threading.Barrier(2, timeout=10), {}

    def min_over_ranks(values):
        slots[threading.get_ident()] = list(values)
        barrier.wait()
        out = [min(col) for col in zip(*slots.values())]
        barrier.wait()
        return out

    monkeypatch.setattr(dist, "min_over_ranks", min_over_ranks)


def _batch_on_each_rank(ranks: list, step: int) -> list:
    """`batch(step)` on every rank at once, one thread per rank: each rank's prompts or its exception."""
    results: list = [None] * len(ranks)

    def run(r: int) -> None:
        try:
            results[r] = ranks[r].batch(step)
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_ranks_that_saw_different_shards_draw_the_same_step_and_stop_together(monkeypatch):
    _two_ranks(monkeypatch)
    feeds = [PromptFeed(), PromptFeed()]  # what each rank has seen of the one feed: rank 1 lags a shard
    feeds[0].add(_prompts(16))
    feeds[1].add(_prompts(8))
    ranks = [StepPrompts(feed=f, stream=True, rank=r, batch_size=8, seed=0, poll_s=0.01) for r, f in enumerate(feeds)]
    for d in ranks:
        d.wait()
    first = _batch_on_each_rank(ranks, 1)
    assert first[0] == first[1] and ranks[0].available == ranks[1].available == 8

    feeds[1].fail("Stage 1 failed: V* of prompt 'p3' is nan")  # seen by rank 1 only
    second = _batch_on_each_rank(ranks, 2)
    assert isinstance(second[0], PipelineStopped) and "another rank" in str(second[0])
    assert isinstance(second[1], PipelineStopped) and "p3" in str(second[1])


def test_stage1_pool_grows_only_into_what_stage2_leaves():
    cfg = load_config("demo", ["vstar.max_actors=8"])  # 1 CPU per engine actor; Stage 2 holds 2 CPUs
    assert pool_cap(cfg, "cpu", {"CPU": 6.0}) == 4
    assert pool_cap(cfg, "cpu", {"CPU": 2.0}) == 0
    cfg = load_config("demo", ["vstar.max_actors=4", "train.num_learners=2", "train.micro_batch_size=32"])
    assert pool_cap(cfg, "cuda", {"CPU": 64.0, "GPU": 4.0}) == 2  # 2 GPUs left for 1-GPU engines
