"""Stage 2's plan: every value derived from the config once, at the driver, before Ray Train starts.

The plan travels to every worker; nothing in it is written back into the config. Decisions
made here and nowhere else: the weight-sync backend, whether the replica sleeps while the
learner trains, the rollout engine's settings, the mini-batch shapes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from apo_ray.config import Config, rollout_in_learner_blocker
from apo_ray.errors import ConfigError
from apo_ray.launch import EngineSpec, engine_spec
from apo_ray.runtime import resolve_dtype, worker_env


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
    sync_backend: str  # shm | local (the replica in the learner's process: `rollout_in_learner`) | ipc | nccl
    sleep_engine: bool  # the replica sleeps while its colocated learner trains (GPU only)
    engine: EngineSpec  # the rollout replica of rank r uses seed engine.seed + r
    output_dir: str  # train.output_dir: an absolute local path or a URI (`train.output.RunDir`)
    run_token: str  # the driver's marker text in a local output_dir (`train.output.check_shared`)
    env: dict


def check_bf16_accumulation(dtype: str, zero_stage: int) -> None:
    """ZeRO-0 in bf16 accumulates gradients in bf16 (DeepSpeed has no fp32 accumulation buffer there)."""
    if dtype == "bfloat16" and zero_stage == 0:
        raise ConfigError(
            "config key 'train.zero_stage': 0 with bfloat16 weights accumulates gradients in bfloat16; use "
            "train.zero_stage=1 or more (fp32 accumulation), or model.dtype=float32"
        )


def rollout_in_learner(cfg: Config, device: str) -> bool:
    """Whether each learner builds its rollout replica in its own process (`train.rollout_process`)."""
    if cfg.train.rollout_process == "actor":
        return False
    why = rollout_in_learner_blocker(cfg, device)
    if why and cfg.train.rollout_process == "learner":
        raise ConfigError(
            f"config key 'train.rollout_process': 'learner' is not possible here: {why}; use 'auto' or 'actor'"
        )
    return why is None


def make_plan(cfg: Config, model_path: str, device: str, reward_fn: str) -> Stage2Plan:
    """The plan of a Stage 2 run on `device` ("cpu" | "cuda"); the config is already validated."""
    t = cfg.train
    group = t.group_size if t.algo == "grpo" else 1
    if device == "cpu":
        backend = "local" if rollout_in_learner(cfg, device) else "shm"
    else:
        rollout_in_learner(cfg, device)  # refuses rollout_process=learner
        backend = "ipc" if t.placement == "colocate" else "nccl"
    sleep = device == "cuda" and t.placement == "colocate" and t.sleep_between_phases
    dtype = resolve_dtype(cfg.model.dtype, device)
    check_bf16_accumulation(dtype, t.zero_stage)
    return Stage2Plan(
        model_path=model_path,
        device=device,
        dtype=dtype,
        reward_fn=reward_fn,
        world_size=t.num_learners,
        group=group,
        num_minibatches=t.rollout_batch_size // t.mini_batch_size,
        seqs_per_minibatch=t.mini_batch_size * group,
        sync_backend=backend,
        sleep_engine=sleep,
        engine=engine_spec(
            cfg,
            model_path=model_path,
            dtype=dtype,
            seed=cfg.sampling.seed,
            enable_sleep_mode=sleep,
            weight_sync=backend,
        ),
        output_dir=t.output_dir if "://" in t.output_dir else str(Path(t.output_dir).expanduser().resolve()),
        run_token=uuid.uuid4().hex,
        env=worker_env(cfg, device),
    )
