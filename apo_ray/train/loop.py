"""Stage 2: on-policy A*-PO (or GRPO) as a Ray Train job with DeepSpeed learners and colocated vLLM.

    python jobs/train.py --config demo [train.num_steps=50 ...]
    ray job submit --working-dir . -- python jobs/train.py --config math_qwen2.5_1.5b

This module is the driver: it resolves the model, joins the prompts with Stage 1's V*
(`train.data`), derives the plan (`train.plan`) and starts a Ray Train TorchTrainer. Each
Ray Train worker is one DeepSpeed data-parallel learner and owns one vLLM rollout replica
(`apo_ray.launch.start_rollout_replica`: colocated on the worker's node, and on GPUs its
device); the step itself, generate -> score -> update -> sync, is `train.recipe`.

Outputs in train.output_dir (a local path or a bucket URI, `train.output`): config.yaml,
metrics.jsonl, tensorboard/, ray/ (Ray Train checkpoints, see `train.checkpoint`), final/
(HF model), summary.json. Re-running the same command continues from the last checkpoint.
Learners on more than one node need a bucket URI or a shared mount (`train.output.check_shared`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

from apo_ray.config import Config, to_dict, to_yaml
from apo_ray.errors import DivergedError
from apo_ray.launch import check_tensor_parallel, colocated_worker_resources
from apo_ray.memory import check_fits as check_memory
from apo_ray.model import check_model, resolve_model
from apo_ray.runtime import check_fits, init_ray, resolve_device, versions
from apo_ray.storage import check_writable, strict_json
from apo_ray.train.checkpoint import RUN_NAME, check_resume
from apo_ray.train.output import RunDir, mark_driver
from apo_ray.train.plan import make_plan
from apo_ray.train.recipe import ERROR_FILE, train_loop

log = logging.getLogger("apo_ray.train")


def run(cfg: Config) -> dict:
    """Run Stage 2; returns a summary (also in train.output_dir/summary.json)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from apo_ray.rewards import checked_reward
    from apo_ray.train.data import load_train_prompts

    t0 = time.time()
    check_tensor_parallel(cfg)
    out = RunDir(cfg.train.output_dir)
    check_writable(out.fs, out.path, "train.output_dir")
    resume_step = check_resume(to_dict(cfg), out, cfg.train.resume)
    model_path = resolve_model(cfg.model.path)
    check_model(model_path, cfg)
    prompts = load_train_prompts(cfg, model_path)  # checks the V* manifest, Stage 1's reward included
    reward = checked_reward(cfg.data.task, cfg.reward.fn, prompts[0].answer)  # Stage 2's reward
    eval_rows = _eval_rows(cfg) if cfg.train.eval_every else []
    if init_ray(cfg.resources) != "cluster":
        check_resources(cfg, resolve_device(cfg.resources))
    device = resolve_device(cfg.resources)
    plan = make_plan(cfg, model_path, device, reward)
    if device == "cuda":  # refuse what cannot fit, before any model loads
        gpu_gib = cfg.resources.gpu_memory_gib or _gpu_gib()
        log.info("memory plan:\n%s", check_memory(cfg, model_path, gpu_gib, plan.dtype).table())
    out.write_text("config.yaml", to_yaml(cfg))  # the maths keys equal the saved ones (check_resume): the config in use
    out.delete(ERROR_FILE)
    mark_driver(out, plan.run_token)
    log.info(
        "Stage 2 (%s): %d prompts, %d steps x %d prompts, %d learner(s) on %s, model %s%s",
        cfg.train.algo,
        len(prompts),
        cfg.train.num_steps,
        cfg.train.rollout_batch_size,
        plan.world_size,
        device,
        model_path,
        f", resuming after step {resume_step}" if resume_step else "",
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
            resources_per_worker=colocated_worker_resources(device, cfg.train.placement, cfg.resources.cpus_per_actor),
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=out.path,
            storage_filesystem=out.fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": plan.env},
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        if out.exists(ERROR_FILE):  # the run stopped itself (recipe.raise_diverged): say why in one line
            raise DivergedError(json.loads(out.read_text(ERROR_FILE))["error"]) from None
        raise
    from apo_ray.metrics import parse_metrics

    rows = parse_metrics(out.read_text("metrics.jsonl")) if out.exists("metrics.jsonl") else []
    summary = {
        "algo": cfg.train.algo,
        "steps": rows[-1]["step"] if rows else 0,
        "final_model": out.uri_of("final"),
        "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_time_s": time.time() - t0,
        "last": rows[-1] if rows else {},
        "versions": versions(),
    }
    out.write_text("summary.json", strict_json(summary, indent=2) + "\n")
    log.info("Stage 2 done: %d steps, final model in %s", summary["steps"], summary["final_model"])
    return summary


def check_resources(cfg: Config, device: str) -> None:
    """Each learner and its rollout replica must fit on this (fixed-size) Ray."""
    t = cfg.train
    per_worker = colocated_worker_resources(device, t.placement, cfg.resources.cpus_per_actor)
    need = {k: v * t.num_learners for k, v in per_worker.items()}  # each learner with its replica
    if device == "cuda" and t.placement == "separate":
        need["GPU"] += t.num_learners * cfg.engine.tensor_parallel_size
        need["CPU"] += t.num_learners
    check_fits(
        need,
        "train.num_learners",
        f"{t.num_learners} learner(s) with their rollout replicas (lower it or resources.cpus_per_actor, "
        "or raise resources.num_cpus)",
    )


def _gpu_gib() -> float:
    """Memory of one of the cluster's GPUs (a one-GPU Ray task asks torch)."""
    import ray

    @ray.remote(num_gpus=1)
    def total() -> float:
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30

    return ray.get(total.remote())


def _eval_rows(cfg: Config) -> list[dict]:
    from apo_ray.data import load_prompts

    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in load_prompts(cfg.data, "eval").rows]
