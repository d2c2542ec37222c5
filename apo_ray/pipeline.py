"""The whole method in one command: Stage 1 (V*) then Stage 2 (A*-PO) in one driver, on one Ray.

    python jobs/pipeline.py --config demo [pipeline.stream=true] [key=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config gsm8k_qwen2.5_1.5b

It writes what jobs/vstar.py followed by jobs/train.py write (vstar.output_dir, train.output_dir;
Stage 2's summary.json gains a "pipeline" timeline), in less wall-clock time: Stage 2's start-up
(Ray Train workers, DeepSpeed learners, their vLLM replicas, a checkpoint to resume) runs while
Stage 1 samples. In order:

1. every check of both stages that needs only the config, before Ray starts (outputs, model,
   prompts, both rewards, resume rules; train.vstar_dir must name vstar.output_dir);
2. Ray up; Stage 1's lock and plan (a complete V* of this config is reused); on a fixed-size Ray,
   Stage 1's smallest actor pool and Stage 2's learners with their replicas must fit at once
   (refused, naming the keys, before anything is written), and Stage 1's pool grows only into
   what Stage 2 leaves (`cap_pool`);
3. Stage 1's output prepared, Stage 2's plan and config.yaml;
4. Stage 2's `TorchTrainer.fit` in a thread: its workers set up, resume, then wait on a
   `PromptFeed` actor (`apo_ray.train.feed`);
5. Stage 1 in this thread;
6. the prompts joined with V* exactly as jobs/train.py joins them (`load_train_prompts`: the same
   checks, the same list) are handed to the workers, which train.

With pipeline.stream=true the feed also gets each shard's prompts as soon as the shard is on
storage (read with the same per-row checks), and the workers start once a step's worth have V*;
until Stage 1 ends each step draws from those (`train.data.stream_batch_indices`; the README says
how this changes the data order). The run-level checks (the manifest, every prompt has a V*, the
reward-error rate) still come at Stage 1's end and stop the run if they fail; until they have
passed, no step is checkpointed and the last step waits for them before the final save.

Failures: if Stage 1 fails, the workers are told and stop, and Stage 1's error is reported; if
Stage 2 fails while Stage 1 runs, Stage 1 stops at its next shard (the shards written stay: a
rerun continues them) and Stage 2's error is reported. Either way one line, exit 2 (`apo_ray.cli`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from apo_ray.config import Config
from apo_ray.errors import ConfigError, VStarMismatchError
from apo_ray.launch import pool_resources
from apo_ray.runtime import add_resources, check_fits, init_ray, resolve_device
from apo_ray.storage import strict_json

log = logging.getLogger("apo_ray.pipeline")

JOIN_TIMEOUT_S = 120.0  # how long a failed pipeline waits for Stage 2's workers to stop


def _same_location(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_config(cfg: Config) -> None:
    """What only the pipeline asks of a config.

    Raises:
        ConfigError: train.vstar_dir is not vstar.output_dir, or pipeline.stream with GRPO.
    """
    if not _same_location(cfg.train.vstar_dir, cfg.vstar.output_dir):
        raise ConfigError(
            f"config key 'train.vstar_dir': {cfg.train.vstar_dir!r}, but the pipeline trains on the V* its Stage 1 "
            f"writes to vstar.output_dir={cfg.vstar.output_dir!r}; set both to the same place"
        )
    if cfg.pipeline.stream and cfg.train.algo != "astar_po":
        raise ConfigError(
            f"config key 'pipeline.stream': train.algo={cfg.train.algo} uses no V*, so there is nothing to stream; "
            "set pipeline.stream=false"
        )


def pipeline_resources(cfg: Config, device: str, with_stage1: bool) -> dict[str, float]:
    """What the pipeline holds at once: Stage 1's smallest pool (unless its V* is reused) and Stage 2."""
    from apo_ray.train.loop import stage2_resources

    stage1 = pool_resources(cfg, device, cfg.vstar.min_actors) if with_stage1 else {}
    return add_resources(stage1, stage2_resources(cfg, device))


def check_resources(cfg: Config, device: str, with_stage1: bool) -> None:
    """Both stages must fit on this fixed-size Ray at once (`runtime.check_fits`), naming the keys."""
    check_fits(
        pipeline_resources(cfg, device, with_stage1),
        ("vstar.min_actors", "train.num_learners"),
        f"Stage 1's {cfg.vstar.min_actors} engine actor(s) and Stage 2's {cfg.train.num_learners} learner(s) "
        "with their rollout replicas, which the pipeline runs at once (lower them or resources.cpus_per_actor, "
        "raise resources.num_cpus, or run jobs/vstar.py then jobs/train.py)",
    )


def pool_cap(cfg: Config, device: str, have: dict[str, float]) -> int:
    """How many Stage 1 engine actors fit in `have` beside Stage 2's learners and replicas (0 if none)."""
    from apo_ray.train.loop import stage2_resources

    stage2 = stage2_resources(cfg, device)
    left = {k: v - stage2.get(k, 0.0) for k, v in have.items()}
    one = pool_resources(cfg, device, 1)
    return int(min(left.get(k, 0.0) // v for k, v in one.items() if v > 0))


def cap_pool(cfg: Config, device: str) -> Config:
    """On a fixed-size Ray, Stage 1's pool may grow (to vstar.max_actors) only into what Stage 2 leaves
    free: Ray Data would otherwise take the learners' CPUs/GPUs while they start, and one stage would
    wait for the other. Returns cfg, or a copy with a lower vstar.max_actors (logged)."""
    import ray

    cap = max(cfg.vstar.min_actors, pool_cap(cfg, device, ray.cluster_resources()))
    if cap >= cfg.vstar.max_actors:
        return cfg
    log.info(
        "vstar.max_actors=%d lowered to %d for the pipeline: Stage 2's %d learner(s) and replicas hold the rest",
        cfg.vstar.max_actors,
        cap,
        cfg.train.num_learners,
    )
    return replace(cfg, vstar=replace(cfg.vstar, max_actors=cap))


def warn_if_crowded(cfg: Config, device: str) -> None:
    """On a cluster reached by address (it may autoscale), warn when Stage 1's largest pool and Stage 2
    do not fit on today's nodes: without an autoscaler the two stages would wait for each other."""
    import ray

    from apo_ray.train.loop import stage2_resources

    need = add_resources(pool_resources(cfg, device, cfg.vstar.max_actors), stage2_resources(cfg, device))
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
    if short:
        log.warning(
            "Stage 1's pool of up to vstar.max_actors=%d and Stage 2's %d learner(s) need %s at once; the cluster "
            "has %s now. Unless it autoscales, lower vstar.max_actors or run jobs/vstar.py then jobs/train.py.",
            cfg.vstar.max_actors,
            cfg.train.num_learners,
            {k: need[k] for k in short},
            {k: have.get(k, 0.0) for k in short},
        )


def _start_feed():
    """The `PromptFeed` actor, on the driver's node (its clock is the driver's: the timeline compares them)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from apo_ray.train.feed import PromptFeed

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    name = f"apo-ray-feed-{uuid.uuid4().hex[:12]}"
    return ray.remote(PromptFeed).options(num_cpus=0, name=name, scheduling_strategy=here).remote()


class _Background(threading.Thread):
    """Runs fn(*args) and keeps its result or exception."""

    def __init__(self, fn, *args: Any):
        super().__init__(name="apo-ray-stage2", daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            self.error = e


class _Stage2Failed(Exception):
    """Raised into Stage 1's loop when Stage 2 has failed, to stop Stage 1 early."""


def run(cfg: Config) -> dict:
    """Run Stage 1 then Stage 2 (see the module doc); returns {"stage1": manifest, "stage2": summary,
    "timeline": seconds since the start of: Stage 1 done, Stage 2 ready, its first step, ...}."""
    import ray

    from apo_ray.train import loop as stage2
    from apo_ray.train.data import load_train_prompts
    from apo_ray.vstar import pipeline as stage1

    t0 = time.time()
    check_config(cfg)
    s1 = stage1.check(cfg)
    s2 = stage2.check(cfg)
    stage2.check_reward(s2, s1.prompts.rows[0]["answer"])
    fixed_size = init_ray(cfg.resources) != "cluster"
    device = resolve_device(cfg.resources)
    feed = None
    try:
        stage1.open_job(s1, device, prepare=False)
        if fixed_size:
            check_resources(cfg, device, with_stage1=s1.reused is None)
            s1.cfg = cap_pool(s1.cfg, device)
        elif s1.reused is None:
            warn_if_crowded(cfg, device)
        stage1.prepare_output(s1)  # only now: a refusal above leaves the previous output as it was
        stage2.open_job(s2, device, None)
        feed = _start_feed()
        trainer = stage2.make_trainer(s2, {"feed": feed, "stream": cfg.pipeline.stream})
        runner = _Background(stage2.fit, s2, trainer)
        runner.start()
        on_shard = _ShardWatcher(cfg, s1, feed, runner, t0)
        try:
            manifest = stage1.sample(s1, on_shard)
            stage1.close(s1)
            t_stage1 = time.time()
            prompts = load_train_prompts(cfg, s2.model_path)  # what jobs/train.py would train on, checked
        except BaseException as e:
            ray.get(feed.fail.remote(f"the pipeline stopped: {type(e).__name__}: {e}"))
            runner.join(JOIN_TIMEOUT_S)
            if isinstance(e, _Stage2Failed):
                raise runner.error from None
            raise
        log.info("Stage 1 done after %.1f s: handing %d prompts with V* to Stage 2", t_stage1 - t0, len(prompts))
        ray.get(feed.finish.remote([asdict(p) for p in prompts]))
        runner.join()
        if runner.error is not None:
            raise runner.error
        timeline = _timeline(ray.get(feed.times.remote()), t0, t_stage1, cfg.pipeline.stream)
    finally:
        stage1.close(s1)
        if feed is not None:
            ray.kill(feed)
    summary = {**runner.result, "pipeline": timeline}
    s2.out.write_text("summary.json", strict_json(summary, indent=2) + "\n")
    log.info(
        "pipeline done in %.1f s: Stage 1 %.1f s; Stage 2 ready after %s s, first step after %s s%s",
        timeline["total_s"],
        timeline["stage1_s"],
        timeline["stage2_ready_s"],
        timeline["first_step_s"],
        f", {timeline['partial_steps']} step(s) before every V* existed" if cfg.pipeline.stream else "",
    )
    return {"stage1": manifest, "stage2": summary, "timeline": timeline}


class _ShardWatcher:
    """Stage 1's on_shard callback: streams the shard's prompts to the feed (pipeline.stream), logs
    when Stage 2 is ready, and stops Stage 1 if Stage 2 has failed."""

    def __init__(self, cfg: Config, s1: Any, feed: Any, runner: _Background, t0: float):
        from apo_ray.train.data import VStarReader

        self.cfg, self.feed, self.runner, self.t0 = cfg, feed, runner, t0
        self.num_shards = s1.plan.num_shards
        self.by_id = {r["prompt_id"]: r for r in s1.prompts.rows} if cfg.pipeline.stream else {}
        self.reader = VStarReader(cfg.vstar.output_dir)
        self.shards = 0
        self.said_ready = False

    def __call__(self, shard: int) -> None:
        import ray

        from apo_ray.train.data import TrainPrompt
        from apo_ray.vstar.pipeline import shard_name

        if self.runner.error is not None:
            log.error("Stage 2 failed while Stage 1 ran; stopping Stage 1 (its shards so far are kept)")
            raise _Stage2Failed()
        self.shards += 1
        if self.cfg.pipeline.stream:
            rows = []
            for pid, v in self.reader.read(shard_name(shard)).items():
                r = self.by_id.get(pid)
                if r is None:
                    raise VStarMismatchError(f"prompt {pid!r} of V* shard {shard_name(shard)} is not a training prompt")
                rows.append(asdict(TrainPrompt(pid, r["prompt"], r["answer"], v)))
            ray.get(self.feed.add.remote(rows))
        if not self.said_ready:
            ready = ray.get(self.feed.times.remote())["ready"]
            if len(ready) == self.cfg.train.num_learners:
                self.said_ready = True
                log.info(
                    "Stage 2's %d learner(s) and replicas are ready after %.1f s; Stage 1 has %d of %d shards",
                    len(ready),
                    max(ready.values()) - self.t0,
                    self.shards,
                    self.num_shards,
                )


def _timeline(times: dict, t0: float, t_stage1: float, stream: bool) -> dict:
    """Seconds since the pipeline started (the feed's clock is the driver's: same node)."""

    def since(t: float | None) -> float | None:
        return round(t - t0, 3) if t is not None else None

    ready = times.get("ready") or {}
    return {
        "stream": stream,
        "stage1_s": since(t_stage1),
        "stage2_ready_s": since(max(ready.values())) if ready else None,
        "handover_s": since(times.get("finish")),
        "first_step_s": since(times.get("first_step")),
        "partial_steps": times.get("partial_steps", 0),
        "total_s": since(time.time()),
    }
