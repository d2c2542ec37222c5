"""The Stage 2 recipe, run by every Ray Train worker: one learner rank and its rollout replica.

    setup -> resume -> for each step: generate, score, update, sync -> (eval, log, checkpoint) -> save final

One step on this rank (`step`):

1. generate: the step's prompts are a pure function of (seed, step) (so a resumed run neither
   repeats nor skips data); this rank takes its share of every mini-batch, and its replica
   samples ONE completion per prompt (GRPO: group_size) with the engine's log-probs;
2. score: the reward function scores them (`RewardScorer`: a raising reward scores 0, counted);
3. update: the learner regresses beta2 * log(pi/pi_ref) onto r - V*(x) (`astar_po_loss`; GRPO:
   `grpo_loss`), one optimizer step per mini-batch, micro-batches with gradient accumulation;
4. sync: the new weights go into the replica (waking it first when it slept during 3).

Correctness signal: `logprob_gap` = mean |engine log-prob - learner log-prob| of the sampled
sequences before the update; it grows if weight sync breaks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_ray.config import Config
from apo_ray.train.output import RunDir, check_shared
from apo_ray.train.plan import Stage2Plan

log = logging.getLogger("apo_ray.train")


@dataclass
class StepContext:
    """What every phase of a step needs, built once per worker by `setup`."""

    cfg: Config
    plan: Stage2Plan
    rank: int
    world: int
    data: Any  # apo_ray.train.feed.StepPrompts: the prompts with V* ({prompt_id, prompt, answer, vstar}) of each step
    eval_rows: list[dict]  # {prompt, answer}: the in-training greedy eval (train.eval_every)
    learner: Any  # apo_ray.train.learner.Learner
    spec: Any  # apo_ray.launch.EngineSpec of this rank's replica (to restart it)
    engine: Any  # the replica's Ray actor handle
    sync: Any  # apo_ray.rollout.weight_sync.WeightSync
    scorer: Any  # apo_ray.rewards.RewardScorer
    pad_id: int


@dataclass
class Rollout:
    """Phases 1-2 of a step: this rank's sequences, scored, as a learner batch."""

    batch: Any  # apo_ray.train.learner.RolloutBatch
    reward_mean: float
    vstar_mean: float
    response_len: float
    gen_tokens: int
    reward_errors: int


# ---------------------------------------------------------------- the worker function


def train_loop(config: dict) -> None:
    """The Ray Train worker function: one learner rank + its rollout replica.

    `config` holds the prompts (an object ref, jobs/train.py) or the pipeline's feed that hands them
    over once Stage 1 has written their V* (`apo_ray.train.feed`): the worker sets up its learner
    and replica, resumes, and only then waits for them.
    """
    if config.get("feed") is not None:  # a worker Ray Train restarts after the pipeline failed: stop at once
        from apo_ray.train.feed import StepPrompts

        StepPrompts(feed=config["feed"], batch_size=1, seed=0).check_failed()
    ctx = setup(config)
    start_step, time_s = resume(ctx)
    ctx.data.wait()
    train(ctx, config["cfg"], start_step, time_s)


def setup(config: dict) -> StepContext:
    import ray
    import ray.train
    import torch

    from apo_ray.config import config_from_dict
    from apo_ray.rewards import RewardScorer, get_reward_fn
    from apo_ray.train.checkpoint import seed_everything
    from apo_ray.train.feed import StepPrompts
    from apo_ray.train.learner import Learner

    cfg: Config = config_from_dict(config["cfg"])
    plan: Stage2Plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    check_reach(RunDir(plan.output_dir), cfg.train.shared_output_dir, plan.run_token)
    seed_everything(cfg.train.seed + rank)
    threads = None
    if plan.device == "cpu":
        threads = cpu_threads(cfg, ctx.get_local_world_size())
        torch.set_num_threads(threads)

    learner = Learner(
        plan.model_path,
        cfg.train,
        world_size=world,
        rank=rank,
        device=plan.device,
        dtype=plan.dtype,
        seqs_per_optimizer_step=plan.seqs_per_minibatch,
        temperature=cfg.sampling.temperature,
    )
    spec = dataclasses.replace(plan.engine, seed=plan.engine.seed + rank, cpu_threads=threads)
    ctx = StepContext(
        cfg=cfg,
        plan=plan,
        rank=rank,
        world=world,
        data=StepPrompts(
            ray.get(config["prompts"]) if "prompts" in config else None,
            feed=config.get("feed"),
            stream=config.get("stream", False),
            rank=rank,
            batch_size=cfg.train.rollout_batch_size,
            seed=cfg.train.seed,
        ),
        eval_rows=ray.get(config["eval_rows"]),
        learner=learner,
        spec=spec,
        engine=None,
        sync=None,
        scorer=RewardScorer(get_reward_fn(plan.reward_fn), plan.reward_fn),
        pad_id=0,
    )
    start_replica(ctx)
    ctx.pad_id = _call(ctx.engine, "tokenizer_eos_id") or 0
    return ctx


def cpu_threads(cfg: Config, learners_here: int) -> int:
    """Torch threads of a CPU learner, and of its rollout replica.

    The two take turns (generate, then update, then sync; never at once), so each may use all the
    CPUs its Ray Train worker reserved for both (`colocated_worker_resources`), but no more than
    its share of this node's cores: Ray's CPUs are logical and may outnumber them. With 2 threads
    instead of 1 the demo model's update takes 0.051 s instead of 0.082 s (measured, 2 vCPUs).
    """
    from apo_ray.launch import colocated_worker_resources

    reserved = colocated_worker_resources("cpu", cfg.train.placement, cfg.resources.cpus_per_actor)["CPU"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(reserved), cores // max(1, learners_here)))


def check_reach(out: RunDir, shared: bool, token: str) -> None:
    """Every learner must reach the one run directory (`train.output.check_shared`); before any model loads."""
    import ray
    import torch.distributed as dist

    me = ray.get_runtime_context().get_node_id()
    nodes = [me]
    if dist.is_initialized() and dist.get_world_size() > 1:
        nodes = [""] * dist.get_world_size()
        dist.all_gather_object(nodes, me)
    check_shared(out, nodes, me, shared, token)


def start_replica(ctx: StepContext) -> None:
    """(Re)start this rank's rollout replica and its weight sync (a new sync: NCCL groups die with the engine).

    With the "local" sync (`train.plan.rollout_in_learner`) the replica is built in this process, once: it
    cannot die alone (a crash takes the learner with it, and Ray Train restarts both).
    """
    from apo_ray.launch import build_engine, make_sync, start_rollout_replica

    if ctx.sync is not None:
        ctx.sync.close()
    if ctx.plan.sync_backend == "local":
        ctx.engine = build_engine(ctx.spec)
    else:
        ctx.engine = start_rollout_replica(
            ctx.spec,
            device=ctx.plan.device,
            placement=ctx.cfg.train.placement,
            env=ctx.plan.env,
            cpus=ctx.cfg.resources.cpus_per_actor,
            timeout_s=ctx.cfg.engine.start_timeout_s,
        )
    ctx.sync = make_sync(ctx.spec, rank=ctx.rank, run_id=f"{Path(ctx.plan.output_dir).name}-{os.getpid()}")


def resume(ctx: StepContext) -> tuple[int, float]:
    """(last step done, training seconds so far): from the checkpoint to resume from, else (0, 0.0)."""
    from apo_ray.metrics import truncate_metrics
    from apo_ray.train.checkpoint import restore_rng, resume_from

    out = RunDir(ctx.plan.output_dir)
    ckpt = resume_from(out)
    step, time_s = 0, 0.0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = ctx.learner.load_checkpoint(d)
        restore_rng(state.get("rng"))
        ctx.sync.push(engine_weights(ctx), ctx.engine)  # the replica starts from the reference weights
        step, time_s = int(state["step"]), float(state.get("time_s", 0.0))
        log.info("rank %d: resumed from step %d (%s)", ctx.rank, step, ckpt.path)
    if ctx.rank == 0:  # the steps after the checkpoint are redone: their old rows go
        out.fetch("metrics.jsonl")
        truncate_metrics(out.local_path("metrics.jsonl"), step)
    return step, time_s


def train(ctx: StepContext, cfg_dict: dict, start_step: int, time_s: float) -> None:
    """Steps start_step + 1 .. train.num_steps (or until train.max_train_seconds), then the final model."""
    from apo_ray.errors import DivergedError
    from apo_ray.metrics import MetricsLogger
    from apo_ray.train import checkpoint
    from apo_ray.train.dist import any_rank

    t, out = ctx.cfg.train, RunDir(ctx.plan.output_dir)
    logger = None
    if ctx.rank == 0:
        logger = MetricsLogger(
            out.local,
            tensorboard=t.tensorboard,
            wandb_project=t.wandb_project,
            mlflow_tracking_uri=t.mlflow_tracking_uri,
            config=cfg_dict,
        )
    # time_s: wall-clock of training (steps, checkpoints, reports), held-out evals excluded, summed
    # over resumed runs: the x-axis of the accuracy-vs-time curves.
    t_iter = time.perf_counter()
    for step in range(start_step + 1, t.num_steps + 1):
        t_step = time.perf_counter()
        metrics = one_step(ctx, step)
        step_s = time.perf_counter() - t_step
        time_s += time.perf_counter() - t_iter
        metrics.update(step_s=step_s, time_s=time_s, tokens_per_s=metrics["gen_tokens"] / step_s)
        if t.eval_every and (step % t.eval_every == 0 or step == t.num_steps) and ctx.rank == 0:
            metrics.update(quick_eval(ctx))
        t_iter = time.perf_counter()
        if logger is not None:
            logger.log(step, metrics)
            if step % 10 == 0 or step == 1:
                _log_step(step, metrics)
        check_finite(step, metrics, out)
        out_of_time = any_rank(t.max_train_seconds is not None and time_s >= t.max_train_seconds)
        last = step == t.num_steps or out_of_time
        if last:  # pipeline.stream: nothing final before Stage 1's run-level checks have passed
            ctx.data.settle()
        # Only checkpoint steps go through Ray Train (each report is a barrier and a log line);
        # every step's metrics reach metrics.jsonl, TensorBoard and the dashboard gauges anyway.
        # A streamed step (V* not all checked yet) is not checkpointed: a rerun must not resume from
        # steps on shards Stage 1's checks may still reject.
        if (step % t.save_every == 0 and ctx.data.complete) or last:
            try:
                checkpoint.save(ctx.learner, out, step, time_s, metrics)
            except DivergedError as e:
                raise_diverged(out, f"step {step}: {e}")
        if out_of_time:
            log.info("rank %d: train.max_train_seconds reached after step %d", ctx.rank, step)
            break

    try:
        ctx.learner.save_hf(out.local_path("final"))
    except DivergedError as e:
        raise_diverged(out, f"the final model: {e}")
    if logger is not None:
        logger.close()
        out.publish("final", "metrics.jsonl", "tensorboard")


ERROR_FILE = "error.json"  # the reason a run stopped itself, for the driver's one-line message


def check_finite(step: int, metrics: dict, out: RunDir) -> None:
    """Stop the run (every rank, same step) if the step's loss, KL or gradient norm is not finite.

    The step's update is not checkpointed; the last checkpoint stays the last good one.
    """
    bad = {k: metrics[k] for k in ("loss", "kl", "grad_norm") if k in metrics and not math.isfinite(metrics[k])}
    if list(bad) == ["grad_norm"] and math.isnan(bad["grad_norm"]):
        return  # no norm reported (finite loss): not divergence; the weights are checked at every save
    if bad:
        raise_diverged(out, f"step {step}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}")


def raise_diverged(out: RunDir, reason: str) -> None:
    import torch.distributed as dist

    from apo_ray.errors import DivergedError
    from apo_ray.storage import strict_json

    msg = (
        f"training diverged at {reason}; nothing after the last checkpoint in {out.uri_of('ray')} was saved. "
        "Lower train.lr or check the inputs (V*, rewards)"
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(ERROR_FILE, strict_json({"error": msg, "time": time.time()}) + "\n")
    raise DivergedError(msg)


def _log_step(step: int, m: dict) -> None:
    log.info(
        "step %d: loss %.4f reward %.3f kl %.4f gap %.2e (%.2f s: gen %.2f train %.2f sync %.2f)",
        step,
        m["loss"],
        m["reward_mean"],
        m["kl"],
        m["logprob_gap"],
        m["step_s"],
        m["generate_s"],
        m["train_s"],
        m["sync_s"],
    )


# ---------------------------------------------------------------- one step


def one_step(ctx: StepContext, step: int) -> dict:
    """One A*-PO / GRPO step on this rank; returns metrics averaged over all ranks."""
    from apo_ray.train.dist import mean_over_ranks

    t0 = time.perf_counter()
    rows, results = generate(ctx, step)
    generate_s = time.perf_counter() - t0
    if ctx.plan.sleep_engine:
        _call(ctx.engine, "sleep", level=ctx.cfg.engine.sleep_level)
    rollout = score(ctx, rows, results)
    t1 = time.perf_counter()
    mb_stats = update(ctx, rollout.batch)
    t2 = time.perf_counter()
    sync(ctx)
    t3 = time.perf_counter()

    w = ctx.world
    local = {
        "reward_mean": rollout.reward_mean,
        "vstar_mean": rollout.vstar_mean,
        "response_len": rollout.response_len,
        "gen_tokens": float(rollout.gen_tokens) * w,  # summed over ranks by the mean below
        "reward_errors": float(rollout.reward_errors) * w,
    }
    for k in mb_stats[0]:
        local[k] = sum(st[k] for st in mb_stats) / len(mb_stats)
    local["logprob_gap"] = mb_stats[0]["logprob_gap"]  # before any update of this step
    metrics = mean_over_ranks(local)
    metrics.update(generate_s=generate_s, train_s=t2 - t1, sync_s=t3 - t2, peak_mem_gb=ctx.learner.peak_memory_gb())
    if ctx.data.stream:  # the pipeline's stream: how many prompts had V* when this step drew its own
        metrics["prompts_with_vstar"] = float(ctx.data.available)
    return metrics


def engine_weights(ctx: StepContext):
    """The learner's weights as the replica takes them: its own tensors for the GPU backends (no
    GPU -> CPU -> GPU copy) and for a replica in this process (vLLM copies them into its own),
    CPU copies for the file-based one; no tied lm_head (vLLM ties it)."""
    return ctx.learner.named_weights(on_device=ctx.plan.sync_backend != "shm", skip_tied=True)


def _call(engine: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """`method` of the replica: through its Ray actor handle, or on the engine itself in this process."""
    from apo_ray.rollout.weight_sync import call_engine

    return call_engine(engine, method, *args, **kwargs)


def step_rows(ctx: StepContext, step: int) -> list[dict]:
    """This rank's prompts of `step`: its 1/world share of each mini-batch, mini-batches in order."""
    rows = ctx.data.batch(step)  # the whole step, the same on every rank
    m, m_r = ctx.cfg.train.mini_batch_size, ctx.cfg.train.mini_batch_size // ctx.world
    return [rows[i * m + ctx.rank * m_r + j] for i in range(ctx.plan.num_minibatches) for j in range(m_r)]


def generate(ctx: StepContext, step: int) -> tuple[list[dict], list]:
    """Phase 1: the replica samples plan.group completions per prompt of this rank's share."""
    import ray

    s, plan = ctx.cfg.sampling, ctx.plan
    rows = step_rows(ctx, step)
    request = dict(
        n=plan.group,
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        seed=(s.seed * 7919 + step) * 1_000_003 + ctx.rank * len(rows) * plan.group,
        logprobs=True,
    )
    prompts = [r["prompt"] for r in rows]
    try:
        results, died = _call(ctx.engine, "generate", prompts, **request), False
    except ray.exceptions.RayActorError as e:
        log.warning("rank %d, step %d: the rollout replica died (%s); restarting it", ctx.rank, step, e)
        results, died = None, True
    if resync_if_died(ctx, died):  # the new replica has the current weights: sample again
        results = _call(ctx.engine, "generate", prompts, **request)
    return rows, results


def resync_if_died(ctx: StepContext, died: bool) -> bool:
    """If any rank's replica died: restart the dead ones and push them the current weights.

    Every rank takes part (under ZeRO-3 the weight gather is a collective); ranks whose
    replica lives only drain the gather. Returns whether this rank's replica was restarted.
    """
    from apo_ray.train.dist import any_rank

    if not any_rank(died):
        return False
    if died:
        start_replica(ctx)
    weights = engine_weights(ctx)
    if died:
        ctx.sync.push(weights, ctx.engine)
    for _ in weights:  # drain: a no-op after a push, the collective gathers otherwise
        pass
    return died


def score(ctx: StepContext, rows: list[dict], results: list) -> Rollout:
    """Phase 2: rewards (and GRPO's group advantages) -> a learner batch."""
    import torch

    from apo_ray.algo import group_advantages
    from apo_ray.train.learner import RolloutBatch

    prompt_ids, response_ids, engine_logps, rewards, vstars, gen_tokens = [], [], [], [], [], 0
    ctx.scorer.reset()
    for row, res in zip(rows, results):
        for comp in res.completions:
            prompt_ids.append(res.prompt_token_ids)
            response_ids.append(comp.token_ids)
            engine_logps.append(comp.logprobs)
            gen_tokens += len(comp.token_ids)
            rewards.append(ctx.scorer(comp.text, row["answer"], where=f"prompt {row['prompt_id']}"))
            vstars.append(row["vstar"])
    errors, _ = ctx.scorer.reset()
    reward_B = torch.tensor(rewards)
    adv_B = group_advantages(reward_B.view(-1, ctx.plan.group)).flatten() if ctx.cfg.train.algo == "grpo" else None
    batch = RolloutBatch.from_sequences(prompt_ids, response_ids, engine_logps, reward_B, vstars, adv_B, ctx.pad_id)
    return Rollout(
        batch=batch,
        reward_mean=reward_B.mean().item(),
        vstar_mean=float(sum(vstars) / len(vstars)),
        response_len=gen_tokens / len(response_ids),
        gen_tokens=gen_tokens,
        reward_errors=errors,
    )


def update(ctx: StepContext, batch: Any) -> list[dict]:
    """Phase 3: one optimizer step per mini-batch (GRPO first takes the old policy's log-probs)."""
    algo, plan = ctx.cfg.train.algo, ctx.plan
    old_logp = ctx.learner.logprobs(batch, ref=False) if algo == "grpo" else None
    per_mb = len(batch) // plan.num_minibatches
    stats = []
    for i in range(plan.num_minibatches):
        sl = slice(i * per_mb, (i + 1) * per_mb)
        stats.append(
            ctx.learner.train_minibatch(
                batch.slice(sl),
                algo=algo,
                normalizer_seqs=plan.seqs_per_minibatch,
                old_logp_BT=old_logp[sl] if old_logp is not None else None,
            )
        )
    return stats


def sync(ctx: StepContext) -> None:
    """Phase 4: the new weights into the replica.

    A replica that slept through the update wakes in two parts around the push (the learner's
    cached blocks freed first): its weights, then its KV cache, so the peak holds the learner,
    vLLM's weights and one sync bucket, never the KV cache too. A replica that died is restarted
    and given the weights (`resync_if_died`). A rank whose push fails otherwise drains the weight
    iterator (the ZeRO-3 gathers are collectives) and every rank then stops together.
    """
    import ray

    from apo_ray.train.dist import any_rank

    died, failed = False, None
    if ctx.plan.sleep_engine:
        ctx.learner.free_cache()
        try:
            _call(ctx.engine, "wake_up", tags=["weights"])
        except ray.exceptions.RayActorError:
            died = True
    weights = engine_weights(ctx)
    try:
        if not died:
            ctx.sync.push(weights, ctx.engine)
    except ray.exceptions.RayActorError as e:
        log.warning("rank %d: the rollout replica died during the weight sync (%s); restarting it", ctx.rank, e)
        died = True
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        failed = e
    for _ in weights:  # drain: a no-op after a complete push, the collective gathers otherwise
        pass
    if any_rank(failed is not None):
        if failed is not None:
            raise failed
        raise RuntimeError(f"rank {ctx.rank}: weight sync failed on another rank; stopping with it")
    if not resync_if_died(ctx, died) and ctx.plan.sleep_engine:
        _call(ctx.engine, "wake_up", tags=["kv_cache"])


def quick_eval(ctx: StepContext) -> dict:
    """Greedy accuracy of the current policy on the held-out set, on the (already synced) replica."""
    import ray

    t0 = time.perf_counter()
    rows = ctx.eval_rows
    prompts = [r["prompt"] for r in rows]
    try:
        results = _call(ctx.engine, "generate", prompts, n=1, temperature=0.0, max_tokens=ctx.cfg.sampling.max_tokens)
    except ray.exceptions.RayActorError as e:  # the next step's generate restarts it (with every rank)
        log.warning("in-training eval skipped: the rollout replica died (%s)", e)
        return {"eval_accuracy": None, "eval_s": time.perf_counter() - t0}
    correct = sum(ctx.scorer(res.completions[0].text, row["answer"], where="eval") for row, res in zip(rows, results))
    return {"eval_accuracy": correct / max(len(rows), 1), "eval_s": time.perf_counter() - t0}
