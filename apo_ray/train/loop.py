"""Stage 2: on-policy A*-PO (or GRPO) as a Ray Train job with DeepSpeed learners and colocated vLLM.

    python jobs/train.py --config demo [train.num_steps=50 ...]
    ray job submit --working-dir . -- python jobs/train.py --config math_qwen2.5_1.5b

Each Ray Train worker is one DeepSpeed data-parallel learner and owns one vLLM rollout
replica, created by the worker on its own node (colocated; on GPUs it shares the
worker's device: vLLM's gpu_memory_utilization + sleep/wake between phases). One step:

1. the step's prompts (a pure function of seed and step, so resume neither repeats nor
   skips data); each rank takes its share of every mini-batch;
2. its rollout replica samples ONE completion per prompt (GRPO: group_size) and returns
   token ids and its own log-probs;
3. the reward function scores them (the one Stage 1 used; checked against its manifest);
4.-5. the learner regresses beta2 * log(pi/pi_ref) onto r - V*(x) (`astar_po_loss`),
   one optimizer step per mini-batch, micro-batches with gradient accumulation;
6. the new weights are pushed into the replica (`apo_ray.rollout.weight_sync`).

Correctness signal: `logprob_gap` = mean |engine log-prob - learner log-prob| of the
sampled sequences before the update; it grows if weight sync breaks.

Outputs in train.output_dir: config.yaml, metrics.jsonl, tensorboard/, ray/ (Ray Train
checkpoints: DeepSpeed state + data position + RNG + an HF copy), final/ (HF model).
Re-running the same command continues from the last checkpoint. metrics.jsonl and
final/ are written by rank 0: on a multi-node cluster, point train.output_dir at a
shared filesystem.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from apo_ray.config import Config, ConfigError, save_config, to_dict
from apo_ray.utils import (
    check_model_dir,
    init_ray,
    resolve_device,
    resolve_dtype,
    resolve_model,
    versions,
    worker_env,
)

log = logging.getLogger("apo_ray.train")
_RUN_NAME = "ray"  # Ray Train run name: checkpoints live in train.output_dir/ray/step_NNNNNN
_COMPLETE = ".apo_complete"


@dataclass(frozen=True)
class Stage2Plan:
    """Values derived from the config for one Stage 2 run (never written back into it)."""

    model_path: str
    device: str
    dtype: str
    reward_fn: str
    world_size: int
    group: int  # completions per prompt: 1 (A*-PO) or train.group_size (GRPO)
    num_minibatches: int
    seqs_per_minibatch: int  # all ranks
    max_model_len: int
    sync_backend: str  # shm | ipc | nccl
    output_dir: str
    env: dict


def make_plan(cfg: Config, model_path: str, device: str, reward_fn: str) -> Stage2Plan:
    t = cfg.train
    group = t.group_size if t.algo == "grpo" else 1
    if t.mini_batch_size % t.num_learners:
        raise ConfigError(
            f"config key 'train.mini_batch_size': {t.mini_batch_size} prompts must split evenly over "
            f"train.num_learners={t.num_learners}"
        )
    if device == "cpu":
        backend = "shm"
    else:
        backend = "ipc" if t.placement == "colocate" else "nccl"
    return Stage2Plan(
        model_path=model_path,
        device=device,
        dtype=resolve_dtype(cfg.model.dtype, device),
        reward_fn=reward_fn,
        world_size=t.num_learners,
        group=group,
        num_minibatches=t.rollout_batch_size // t.mini_batch_size,
        seqs_per_minibatch=t.mini_batch_size * group,
        max_model_len=cfg.sampling.max_prompt_tokens + cfg.sampling.max_tokens,
        sync_backend=backend,
        output_dir=str(Path(t.output_dir).expanduser().resolve()),
        env=worker_env(cfg, device),
    )


# ---------------------------------------------------------------- driver


def run(cfg: Config) -> dict:
    """Run Stage 2; returns a summary (also in train.output_dir/summary.json)."""
    import json

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from apo_ray.rewards import reward_fn_name
    from apo_ray.train.data import load_train_prompts

    t0 = time.time()
    model_path = resolve_model(cfg.model.path)
    check_model_dir(model_path)
    reward = reward_fn_name(cfg.data.task, cfg.reward.fn)
    prompts = load_train_prompts(cfg, reward, model_path)
    init_ray(cfg.resources)
    device = resolve_device(cfg.resources)
    plan = make_plan(cfg, model_path, device, reward)
    out = Path(plan.output_dir)
    save_config(cfg, out)
    eval_rows = _eval_rows(cfg) if cfg.train.eval_every else []
    log.info(
        "Stage 2 (%s): %d prompts, %d steps x %d prompts, %d learner(s) on %s, model %s",
        cfg.train.algo,
        len(prompts),
        cfg.train.num_steps,
        cfg.train.rollout_batch_size,
        plan.world_size,
        device,
        model_path,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "plan": plan,
            "prompts": ray.put([asdict(p) for p in prompts]),
            "eval_rows": ray.put(eval_rows),
        },
        torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=device == "cuda",
            resources_per_worker={"CPU": cfg.resources.cpus_per_actor} if device == "cpu" else None,
        ),
        run_config=RunConfig(
            name=_RUN_NAME,
            storage_path=str(out),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": plan.env},
        ),
    )
    result = trainer.fit()
    from apo_ray.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    summary = {
        "algo": cfg.train.algo,
        "steps": rows[-1]["step"] if rows else 0,
        "final_model": str(out / "final"),
        "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_time_s": time.time() - t0,
        "last": rows[-1] if rows else {},
        "versions": versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Stage 2 done: %d steps, final model in %s", summary["steps"], summary["final_model"])
    return summary


def _eval_rows(cfg: Config) -> list[dict]:
    from apo_ray.data import load_prompts

    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in load_prompts(cfg.data, "eval").rows]


# ---------------------------------------------------------------- worker


def train_loop(config: dict) -> None:
    """The Ray Train worker function: one learner rank + its rollout replica."""
    import ray
    import ray.train
    import torch

    from apo_ray.config import config_from_dict
    from apo_ray.metrics import MetricsLogger
    from apo_ray.rewards import get_reward_fn
    from apo_ray.rollout.weight_sync import make_weight_sync
    from apo_ray.train.learner import Learner

    cfg: Config = config_from_dict(config["cfg"])
    plan: Stage2Plan = config["plan"]
    prompts: list[dict] = ray.get(config["prompts"])
    eval_rows: list[dict] = ray.get(config["eval_rows"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(cfg.train.seed + rank)
    if plan.device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_actor)))

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
    engine = _make_engine(cfg, plan, rank)
    sync = make_weight_sync(plan.sync_backend, rank=rank, run_id=f"{Path(plan.output_dir).name}-{os.getpid()}")
    reward_fn = get_reward_fn(plan.reward_fn)
    pad_id = ray.get(engine.tokenizer_eos_id.remote()) or 0

    start_step, time_s = 0, 0.0
    ckpt = _resume_checkpoint(Path(plan.output_dir))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = learner.load_checkpoint(d)
        start_step, time_s = int(state["step"]), float(state.get("time_s", 0.0))
        _restore_rng(state.get("rng"), rank)
        sync.push(learner.named_weights(), engine)  # the replica starts from the reference weights
        log.info("rank %d: resumed from step %d (%s)", rank, start_step, ckpt.path)

    logger = None
    if rank == 0:
        logger = MetricsLogger(
            plan.output_dir,
            tensorboard=cfg.train.tensorboard,
            wandb_project=cfg.train.wandb_project,
            mlflow_tracking_uri=cfg.train.mlflow_tracking_uri,
            config=config["cfg"],
        )
    # time_s: wall-clock of training (steps, checkpoints, reports), held-out evals excluded, summed
    # over resumed runs: the x-axis of the accuracy-vs-time curves.
    t_iter = time.perf_counter()
    for step in range(start_step + 1, cfg.train.num_steps + 1):
        t_step = time.perf_counter()
        metrics = _one_step(cfg, plan, step, rank, world, prompts, engine, learner, sync, reward_fn, pad_id)
        step_s = time.perf_counter() - t_step
        time_s += time.perf_counter() - t_iter
        metrics.update(step_s=step_s, time_s=time_s, tokens_per_s=metrics["gen_tokens"] / step_s)
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.num_steps) and rank == 0:
            metrics.update(_quick_eval(engine, eval_rows, reward_fn, cfg))
        t_iter = time.perf_counter()
        if logger is not None:
            logger.log(step, metrics)
            if step % 10 == 0 or step == 1:
                log.info(
                    "step %d: loss %.4f reward %.3f kl %.4f gap %.2e (%.2f s: gen %.2f train %.2f sync %.2f)",
                    step,
                    metrics["loss"],
                    metrics["reward_mean"],
                    metrics["kl"],
                    metrics["logprob_gap"],
                    step_s,
                    metrics["generate_s"],
                    metrics["train_s"],
                    metrics["sync_s"],
                )
        out_of_time = _any_rank(cfg.train.max_train_seconds is not None and time_s >= cfg.train.max_train_seconds)
        _report(cfg, Path(plan.output_dir), learner, step, time_s, metrics, force_checkpoint=out_of_time)
        if out_of_time:
            log.info("rank %d: train.max_train_seconds reached after step %d", rank, step)
            break

    learner.save_hf(str(Path(plan.output_dir) / "final"))
    if logger is not None:
        logger.close()


def _one_step(cfg, plan, step, rank, world, prompts, engine, learner, sync, reward_fn, pad_id) -> dict:
    """One A*-PO / GRPO step on this rank; returns metrics averaged over all ranks."""
    import ray
    import torch

    from apo_ray.algo import group_advantages
    from apo_ray.train.data import batch_indices
    from apo_ray.train.learner import RolloutBatch

    t, s = cfg.train, cfg.sampling
    idx = batch_indices(len(prompts), t.rollout_batch_size, step - 1, t.seed)
    m, m_r = t.mini_batch_size, t.mini_batch_size // world
    mine = [idx[i * m + rank * m_r + j] for i in range(plan.num_minibatches) for j in range(m_r)]
    rows = [prompts[i] for i in mine]

    t0 = time.perf_counter()
    results = ray.get(
        engine.generate.remote(
            [r["prompt"] for r in rows],
            n=plan.group,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            seed=(s.seed * 7919 + step) * 1_000_003 + rank * len(rows) * plan.group,
            logprobs=True,
        )
    )
    generate_s = time.perf_counter() - t0
    if plan.device == "cuda" and t.placement == "colocate" and t.sleep_between_phases:
        ray.get(engine.sleep.remote())

    prompt_ids, response_ids, engine_logps, rewards, vstars, errors, gen_tokens = [], [], [], [], [], 0, 0
    for row, res in zip(rows, results):
        for comp in res.completions:
            prompt_ids.append(res.prompt_token_ids)
            response_ids.append(comp.token_ids)
            engine_logps.append(comp.logprobs)
            gen_tokens += len(comp.token_ids)
            try:
                rewards.append(float(reward_fn(comp.text, row["answer"])))
            except Exception:  # noqa: BLE001 - a failing reward scores 0 and is counted
                rewards.append(0.0)
                errors += 1
            vstars.append(row["vstar"])
    reward_B = torch.tensor(rewards)
    adv_B = group_advantages(reward_B.view(-1, plan.group)).flatten() if t.algo == "grpo" else None
    batch = RolloutBatch.from_sequences(prompt_ids, response_ids, engine_logps, reward_B, vstars, adv_B, pad_id)

    t1 = time.perf_counter()
    old_logp = learner.logprobs(batch, ref=False) if t.algo == "grpo" else None
    per_mb = len(batch) // plan.num_minibatches
    mb_stats = []
    for i in range(plan.num_minibatches):
        sl = slice(i * per_mb, (i + 1) * per_mb)
        mb_stats.append(
            learner.train_minibatch(
                batch.slice(sl),
                algo=t.algo,
                normalizer_seqs=plan.seqs_per_minibatch,
                old_logp_BT=old_logp[sl] if old_logp is not None else None,
            )
        )
    train_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    if plan.device == "cuda" and t.placement == "colocate" and t.sleep_between_phases:
        ray.get(engine.wake_up.remote())
    sync.push(learner.named_weights(), engine)
    sync_s = time.perf_counter() - t2

    local = {
        "reward_mean": reward_B.mean().item(),
        "vstar_mean": float(sum(vstars) / len(vstars)),
        "response_len": gen_tokens / len(response_ids),
        "gen_tokens": float(gen_tokens) * world,  # summed over ranks by the mean below
        "reward_errors": float(errors) * world,
    }
    for k in mb_stats[0]:
        local[k] = sum(st[k] for st in mb_stats) / len(mb_stats)
    local["logprob_gap"] = mb_stats[0]["logprob_gap"]  # before any update of this step
    metrics = _mean_over_ranks(local, plan.device)
    metrics.update(generate_s=generate_s, train_s=train_s, sync_s=sync_s, peak_mem_gb=learner.peak_memory_gb())
    return metrics


def _mean_over_ranks(values: dict[str, float], device: str) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(values[k]) for k in keys}
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    vec /= dist.get_world_size()
    return dict(zip(keys, vec.tolist()))


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _quick_eval(engine, rows: list[dict], reward_fn, cfg: Config) -> dict:
    """Greedy accuracy of the current policy on the held-out set, on the (already synced) replica."""
    import ray

    t0 = time.perf_counter()
    results = ray.get(
        engine.generate.remote([r["prompt"] for r in rows], n=1, temperature=0.0, max_tokens=cfg.sampling.max_tokens)
    )
    correct = 0.0
    for row, res in zip(rows, results):
        try:
            correct += float(reward_fn(res.completions[0].text, row["answer"]))
        except Exception:  # noqa: BLE001
            pass
    return {"eval_accuracy": correct / max(len(rows), 1), "eval_s": time.perf_counter() - t0}


def _report(
    cfg: Config, out: Path, learner, step: int, time_s: float, metrics: dict, force_checkpoint: bool = False
) -> None:
    import tempfile

    import ray.train
    import torch
    from ray.train import Checkpoint

    # Only checkpoint steps go through Ray Train (each report is a barrier and a log line);
    # every step's metrics reach metrics.jsonl, TensorBoard and the dashboard gauges anyway.
    if step % cfg.train.save_every and step != cfg.train.num_steps and not force_checkpoint:
        return
    name = f"step_{step:06d}"
    with tempfile.TemporaryDirectory(prefix="apo-ckpt-") as d:
        learner.save_checkpoint(d, {"step": step, "time_s": time_s, "rng": _rng_state()})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    # Ray Train registers a reported checkpoint when its controller next polls the workers
    # (every 2 s): a worker that dies sooner would restart from an older one. Once every rank's
    # upload is done, a marker lets the restart find this checkpoint in storage instead.
    torch.distributed.barrier()
    stored = out / _RUN_NAME / name
    if torch.distributed.get_rank() == 0 and stored.is_dir():
        (stored / _COMPLETE).touch()


def _resume_checkpoint(out: Path):
    """The newest checkpoint to resume from: Ray Train's latest registered one, or a newer one
    in storage that every rank finished uploading (see `_report`). None on a fresh run."""
    import ray.train
    from ray.train import Checkpoint

    def step_of(path: str) -> int:
        name = Path(path).name
        return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1

    ckpt = ray.train.get_checkpoint()
    best = step_of(ckpt.path) if ckpt is not None else -1
    for d in (out / _RUN_NAME).glob("step_*"):
        if (d / _COMPLETE).exists() and step_of(d.name) > best:
            ckpt, best = Checkpoint.from_directory(str(d)), step_of(d.name)
    return ckpt


def _make_engine(cfg: Config, plan: Stage2Plan, rank: int):
    """This rank's vLLM rollout replica, on this worker's node (and GPU, when colocated)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from apo_ray.rollout.engine import RolloutEngine

    env = dict(plan.env)
    opts: dict = {"num_cpus": cfg.resources.cpus_per_actor}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    if plan.device == "cuda" and cfg.train.placement == "colocate":
        # Share this worker's GPU without Ray accounting for it twice (vLLM takes
        # engine.gpu_memory_utilization of it and sleeps while the learner trains).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ray.get_gpu_ids())
        opts.update(num_gpus=0, scheduling_strategy=here)
    elif plan.device == "cuda":
        opts.update(num_gpus=cfg.engine.tensor_parallel_size)
    else:
        opts.update(scheduling_strategy=here)
    e = cfg.engine
    actor = (
        ray.remote(RolloutEngine)
        .options(runtime_env={"env_vars": env}, **opts)
        .remote(
            plan.model_path,
            dtype=plan.dtype,
            max_model_len=plan.max_model_len,
            seed=cfg.sampling.seed + rank,
            tensor_parallel_size=e.tensor_parallel_size,
            gpu_memory_utilization=e.gpu_memory_utilization,
            enforce_eager=e.enforce_eager,
            max_num_seqs=e.max_num_seqs,
            enable_sleep_mode=plan.device == "cuda" and cfg.train.sleep_between_phases,
            weight_sync=plan.sync_backend,
        )
    )
    ray.get(actor.ready.remote())
    return actor


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _restore_rng(state: dict | None, rank: int) -> None:
    import numpy as np
    import torch

    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    del rank
