"""Stage 2: on-policy A*-PO (or GRPO) as a Ray Train job with DeepSpeed learners and colocated vLLM.

    python jobs/train.py --config demo [train.num_steps=50 ...]
    ray job submit --working-dir . -- python jobs/train.py --config math_qwen2.5_1.5b

This module is the driver: it resolves the model, joins the prompts with Stage 1's V*
(`train.data`), derives the plan (`train.plan`) and starts a Ray Train TorchTrainer. Each
Ray Train worker is one DeepSpeed data-parallel learner and owns one vLLM rollout replica
(`apo_ray.launch.start_rollout_replica`: colocated on the worker's node, and on GPUs its
device; a single CPU learner builds it in its own process, `train.rollout_process`); the step
itself, generate -> score -> update -> sync, is `train.recipe`.

Outputs in train.output_dir (a local path or a bucket URI, `train.output`): config.yaml,
metrics.jsonl, tensorboard/, ray/ (Ray Train checkpoints, see `train.checkpoint`), final/
(HF model), summary.json. Re-running the same command continues from the last checkpoint.
Learners on more than one node need a bucket URI or a shared mount (`train.output.check_shared`).

`run` is a sequence of phases (`check`, `check_reward`, `open_job`, `make_trainer`, `fit`) that
`apo_ray.pipeline` also drives, starting the trainer while Stage 1 still runs and handing the
workers the prompts through a feed (`train.feed`) instead of up front.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from apo_ray.config import Config, to_dict, to_yaml
from apo_ray.errors import DivergedError
from apo_ray.launch import check_tensor_parallel, colocated_worker_resources
from apo_ray.memory import check_fits as check_memory
from apo_ray.model import check_model, resolve_model
from apo_ray.runtime import check_fits, init_ray, resolve_device, versions
from apo_ray.storage import check_writable, strict_json
from apo_ray.train.checkpoint import RUN_NAME, check_resume
from apo_ray.train.output import RunDir, mark_driver
from apo_ray.train.plan import Stage2Plan, make_plan
from apo_ray.train.recipe import ERROR_FILE, train_loop

log = logging.getLogger("apo_ray.train")


@dataclass
class Stage2Job:
    """One Stage 2 run, in the phases a driver may interleave with other work (`apo_ray.pipeline`):
    `check` (no Ray, no V*) -> `check_reward` -> `open_job` (Ray up) -> `make_trainer` -> `fit`."""

    cfg: Config
    t0: float
    out: RunDir
    resume_step: int
    model_path: str
    reward: str = ""  # Stage 2's reward spec, once `check_reward` has checked it
    plan: Stage2Plan | None = None
    eval_rows: list[dict] = field(default_factory=list)


def run(cfg: Config) -> dict:
    """Run Stage 2; returns a summary (also in train.output_dir/summary.json)."""
    import ray

    from apo_ray.train.data import load_train_prompts

    job = check(cfg)
    prompts = load_train_prompts(cfg, job.model_path)  # checks the V* manifest, Stage 1's reward included
    check_reward(job, prompts[0].answer)
    if init_ray(cfg.resources) != "cluster":
        check_resources(cfg, resolve_device(cfg.resources))
    open_job(job, resolve_device(cfg.resources), len(prompts))
    return fit(job, make_trainer(job, {"prompts": ray.put([asdict(p) for p in prompts])}))


def check(cfg: Config) -> Stage2Job:
    """Every Stage 2 check that needs neither Ray nor V*: tensor parallel placement, the output
    directory (writable; may this run resume there?) and the model."""
    t0 = time.time()
    check_tensor_parallel(cfg)
    out = RunDir(cfg.train.output_dir)
    check_writable(out.fs, out.path, "train.output_dir")
    resume_step = check_resume(to_dict(cfg), out, cfg.train.resume)
    model_path = resolve_model(cfg.model.path)
    check_model(model_path, cfg)
    return Stage2Job(cfg, t0, out, resume_step, model_path)


def check_reward(job: Stage2Job, answer: str) -> None:
    """Stage 2's reward (reward.fn) keeps its contract on a reference `answer`; at the driver, before Ray."""
    from apo_ray.rewards import checked_reward

    job.reward = checked_reward(job.cfg.data.task, job.cfg.reward.fn, answer)
    job.eval_rows = _eval_rows(job.cfg) if job.cfg.train.eval_every else []


def open_job(job: Stage2Job, device: str, num_prompts: int | None) -> None:
    """Derive the plan (on GPUs: refuse what cannot fit in memory) and write the run's config.yaml.
    Call after `check_reward`, once Ray is up.

    Args:
        num_prompts: training prompts (None: not known yet, the pipeline's Stage 1 is running).
    """
    cfg, out = job.cfg, job.out
    job.plan = plan = make_plan(cfg, job.model_path, device, job.reward)
    if device == "cuda":  # refuse what cannot fit, before any model loads
        gpu_gib = cfg.resources.gpu_memory_gib or _gpu_gib()
        log.info("memory plan:\n%s", check_memory(cfg, job.model_path, gpu_gib, plan.dtype).table())
    out.write_text("config.yaml", to_yaml(cfg))  # the maths keys equal the saved ones (check_resume): the config in use
    out.delete(ERROR_FILE)
    mark_driver(out, plan.run_token)
    log.info(
        "Stage 2 (%s): %s prompts, %d steps x %d prompts, %d learner(s) on %s, model %s%s",
        cfg.train.algo,
        num_prompts if num_prompts is not None else "(after Stage 1)",
        cfg.train.num_steps,
        cfg.train.rollout_batch_size,
        plan.world_size,
        device,
        job.model_path,
        f", resuming after step {job.resume_step}" if job.resume_step else "",
    )


def make_trainer(job: Stage2Job, data: dict):
    """The Ray Train TorchTrainer of this run; `data`: {"prompts": object ref} or {"feed": handle, "stream": bool}
    (`train.recipe.train_loop`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, plan, out = job.cfg, job.plan, job.out
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "plan": plan, "eval_rows": ray.put(job.eval_rows), **data},
        torch_config=TorchConfig(backend="nccl" if plan.device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=plan.device == "cuda",
            resources_per_worker=colocated_worker_resources(
                plan.device, cfg.train.placement, cfg.resources.cpus_per_actor
            ),
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


def fit(job: Stage2Job, trainer, extra: dict | None = None) -> dict:
    """Run the trainer to the end; write and return the summary (`extra` keys added to it).

    Raises:
        DivergedError: the run stopped itself (a non-finite loss or weight), in one line.
    """
    cfg, out = job.cfg, job.out
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
        "wall_time_s": time.time() - job.t0,
        "last": rows[-1] if rows else {},
        "versions": versions(),
        **(extra or {}),
    }
    out.write_text("summary.json", strict_json(summary, indent=2) + "\n")
    log.info("Stage 2 done: %d steps, final model in %s", summary["steps"], summary["final_model"])
    return summary


def stage2_resources(cfg: Config, device: str) -> dict[str, float]:
    """Ray resources of Stage 2: each learner with its rollout replica."""
    t = cfg.train
    per_worker = colocated_worker_resources(device, t.placement, cfg.resources.cpus_per_actor)
    need = {k: v * t.num_learners for k, v in per_worker.items()}
    if device == "cuda" and t.placement == "separate":
        need["GPU"] += t.num_learners * cfg.engine.tensor_parallel_size
        need["CPU"] += t.num_learners
    return need


def check_resources(cfg: Config, device: str) -> None:
    """Each learner and its rollout replica must fit on this (fixed-size) Ray."""
    check_fits(
        stage2_resources(cfg, device),
        "train.num_learners",
        f"{cfg.train.num_learners} learner(s) with their rollout replicas (lower it or resources.cpus_per_actor, "
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
