"""The one place a config becomes Ray actors: vLLM engines, actor pools and weight sync.

Stage 1 (`vstar`), Stage 2 (`train`) and evaluation (`evaluation`) all ask here, so each
resource rule is read one way:

    spec = engine_spec(cfg, model_path=..., dtype=..., seed=...)     # what every engine is built from
    engine = build_engine(spec)                                     # inside an actor: the RolloutEngine
    for row in fan_out(cfg, device, Worker, {...}, items, ...):     # Ray Data actor pool (Stage 1, eval)
        ...
    actor = start_rollout_replica(spec, plan)                       # Stage 2: one replica per learner
    sync = make_sync(spec, backend, rank=..., run_id=...)           # learner -> replica weight sync

Tensor parallelism, one policy (`check_tensor_parallel`, `engine_actor_options`):

- An engine with tensor_parallel_size = tp on GPUs gets its tp GPUs reserved by its own actor
  (``num_gpus=tp``) and runs its tensor-parallel workers as processes inside that reservation
  (vLLM's "mp" executor; the "ray" executor would ask Ray for tp more GPUs from inside an actor
  that already holds them). So tp is at most the GPUs of one node.
- Stage 2 with train.placement=colocate shares each learner's single GPU with its replica, so it
  needs tp = 1; colocate with tp > 1 is refused before Ray starts (use train.placement=separate).
- The NCCL weight sync rendezvouses with 1 + tp ranks (the learner and the engine's tp workers).

On CPU (vLLM-CPU) an engine is one in-process worker; its actor takes resources.cpus_per_actor CPUs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from apo_ray.config import Config
from apo_ray.errors import ApoRayError, ConfigError

log = logging.getLogger("apo_ray.launch")


# ---------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineSpec:
    """Everything a `RolloutEngine` is built from (picklable: it travels into actors)."""

    model_path: str
    dtype: str
    max_model_len: int
    seed: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enforce_eager: bool
    max_num_seqs: int
    enable_sleep_mode: bool = False
    weight_sync: bool | str = False  # False, or the backend the learner pushes with (shm | ipc | nccl)
    cpu_threads: int | None = None  # vLLM-CPU: torch threads of the engine (None: its process's default)
    cpu_gemm: str = "onednn"  # vLLM-CPU with weight sync: the linear kernel after each sync (engine.cpu_gemm)
    cpu_kvcache_gib: float = 1.0  # vLLM-CPU: the KV cache's size (engine.cpu_kvcache_gib)


def engine_spec(
    cfg: Config,
    *,
    model_path: str,
    dtype: str,
    seed: int,
    enable_sleep_mode: bool = False,
    weight_sync: bool | str = False,
) -> EngineSpec:
    """The engine settings of `cfg.engine` and `cfg.sampling` for one model."""
    e = cfg.engine
    return EngineSpec(
        model_path=model_path,
        dtype=dtype,
        max_model_len=cfg.sampling.max_prompt_tokens + cfg.sampling.max_tokens,
        seed=seed,
        tensor_parallel_size=e.tensor_parallel_size,
        gpu_memory_utilization=e.gpu_memory_utilization,
        enforce_eager=e.enforce_eager,
        max_num_seqs=e.max_num_seqs,
        enable_sleep_mode=enable_sleep_mode,
        weight_sync=weight_sync,
        cpu_gemm=e.cpu_gemm,
        cpu_kvcache_gib=e.cpu_kvcache_gib,
    )


def _engine_kwargs(spec: EngineSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


def build_engine(spec: EngineSpec):
    """The `RolloutEngine` of `spec`, in this process (call it inside the actor that owns it)."""
    from apo_ray.rollout.engine import RolloutEngine

    return RolloutEngine(**_engine_kwargs(spec))


def check_tensor_parallel(cfg: Config) -> None:
    """Refuse, before Ray starts, a Stage 2 placement that cannot hold the engine's tensor parallel size."""
    tp = cfg.engine.tensor_parallel_size
    if tp > 1 and cfg.train.placement == "colocate":
        raise ConfigError(
            f"config key 'engine.tensor_parallel_size': {tp} needs {tp} GPUs per rollout replica, but "
            "train.placement=colocate shares each learner's one GPU with its replica; use "
            "train.placement=separate (each replica reserves its own GPUs) or tensor_parallel_size=1"
        )


def engine_actor_options(device: str, tensor_parallel_size: int, cpus_per_actor: float) -> dict:
    """Ray resources of an actor that owns one engine on its own devices (Stage 1, eval, separate rollout)."""
    if device == "cuda":
        return {"num_gpus": tensor_parallel_size, "num_cpus": 1}
    return {"num_cpus": cpus_per_actor}


# ---------------------------------------------------------------- actor pools (Stage 1, eval)


def pool_resources(cfg: Config, device: str, min_actors: int) -> dict[str, float]:
    """Ray resources of the smallest actor pool: `min_actors` engine actors."""
    opts = engine_actor_options(device, cfg.engine.tensor_parallel_size, cfg.resources.cpus_per_actor)
    need = {"CPU": float(min_actors * opts["num_cpus"])}
    if "num_gpus" in opts:
        need["GPU"] = float(min_actors * opts["num_gpus"])
    return need


def check_pool_fits(cfg: Config, device: str, min_actors: int, key: str) -> None:
    """The smallest actor pool (`min_actors` engines) must fit on a fixed-size Ray (`runtime.check_fits`)."""
    from apo_ray.runtime import check_fits

    opts = engine_actor_options(device, cfg.engine.tensor_parallel_size, cfg.resources.cpus_per_actor)
    check_fits(pool_resources(cfg, device, min_actors), key, f"{min_actors} engine actor(s) of {opts}")


def pool_item(rows: Sequence[dict], **extra: Any) -> dict:
    """One unit of pool work: the prompt columns of `rows` plus `extra` scalars (shard, start)."""
    return {
        **extra,
        "prompt_id": [r["prompt_id"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "answer": [r["answer"] for r in rows],
    }


def fan_out(
    cfg: Config,
    device: str,
    worker_cls: type,
    worker_kwargs: dict,
    items: list[dict],
    *,
    min_actors: int,
    max_actors: int,
    env: dict[str, str],
    label: str,
    total_prompts: int,
    count: Callable[[dict], tuple[int, int]] = lambda row: (1, 0),
    log_every_s: float = 10.0,
) -> Iterator[dict]:
    """Run `worker_cls` over `items` on an autoscaling Ray Data actor pool; yield the output rows.

    Each item is one call of the worker (``batch_size=1``); every actor owns one engine and gets
    `engine_actor_options`. Progress is logged every `log_every_s` and at the end.

    Args:
        worker_cls: a Ray Data callable class, built with `worker_kwargs` once per actor.
        items: `pool_item` dicts.
        env: the actors' environment (`runtime.worker_env`).
        label: names the job in progress lines ("Stage 1", "eval").
        total_prompts: prompts in all items (for the progress percentage).
        count: (prompts, generated tokens) that one output row stands for.
    """
    import ray

    # Work starts once min_actors engines are up (so a multi-node pool shares it from the first
    # item), and a pool that cannot get them within engine.start_timeout_s fails instead of waiting.
    ray.data.DataContext.get_current().wait_for_min_actors_s = max(1, int(cfg.engine.start_timeout_s))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    results = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        runtime_env={"env_vars": env},
        **engine_actor_options(device, cfg.engine.tensor_parallel_size, cfg.resources.cpus_per_actor),
    )
    done = tokens = 0
    t0 = last = time.time()
    rows = _rows_as_they_come(results)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ray.exceptions.GetTimeoutError:
            each = engine_actor_options(device, cfg.engine.tensor_parallel_size, cfg.resources.cpus_per_actor)
            raise ApoRayError(
                f"{label}: {min_actors} engine actor(s) of {each} did not start within "
                f"engine.start_timeout_s={cfg.engine.start_timeout_s:g} s; the cluster cannot hold them"
                " (lower the pool's min_actors or resources.cpus_per_actor, or add nodes)"
            ) from None
        prompts, toks = count(row)
        done, tokens = done + prompts, tokens + toks
        now = time.time()
        if now - last >= log_every_s or done == total_prompts:
            last = now
            rate = f"{done / (now - t0):.1f} prompts/s" + (f", {tokens / (now - t0):.0f} tokens/s" if tokens else "")
            log.info(
                "%s progress: %d/%d prompts (%.1f%%), %s", label, done, total_prompts, 100 * done / total_prompts, rate
            )
        yield row


def _rows_as_they_come(ds) -> Iterator[dict]:
    """The rows of `ds` (as `iter_rows` gives them), each as soon as its block is done.

    `Dataset.iter_rows` prefetches one block: it hands a block over only once the next one is
    done (or the dataset ends), so a Stage 1 shard would reach the pipeline's stream a whole shard
    late. Without prefetching, each item's row comes back when its actor call returns.
    """
    from ray.data.block import BlockAccessor

    for batch in ds.iter_batches(batch_size=None, batch_format=None, prefetch_batches=0):
        yield from BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).iter_rows(public_row_format=True)


# ---------------------------------------------------------------- Stage 2 rollout replicas


def colocated_worker_resources(device: str, placement: str, cpus_per_actor: float) -> dict:
    """Ray resources of one Stage 2 learner worker, including those of its colocated replica."""
    if device == "cuda":
        cpus = 1.0 + (cpus_per_actor if placement == "colocate" else 0.0)
        return {"CPU": cpus, "GPU": 1.0}
    return {"CPU": 2 * cpus_per_actor}  # vLLM-CPU: the replica is always on the learner's node


def start_rollout_replica(
    spec: EngineSpec, *, device: str, placement: str, env: dict[str, str], cpus: float, timeout_s: float
):
    """Start this learner's rollout replica as a Ray actor and wait until its engine is up.

    Colocated (the default), the replica runs on this worker's node and asks Ray for nothing: the
    learner's Ray Train worker reserved the replica's CPUs (and shares its GPU) together with its
    own (`colocated_worker_resources`), so a replica can never wait for resources its learner's
    node lacks. On GPUs vLLM takes engine.gpu_memory_utilization of the learner's GPU and sleeps
    while the learner trains. Separate, it reserves its own GPUs (`engine_actor_options`).
    Call from inside the Ray Train worker.

    Raises:
        ConfigError: the engine was not up after `timeout_s` (engine.start_timeout_s).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from apo_ray.rollout.engine import RolloutEngine

    env = dict(env)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    if device == "cuda" and placement == "separate":
        opts = engine_actor_options(device, spec.tensor_parallel_size, cpus)
    elif device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ray.get_gpu_ids())
        opts = {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": here}
    else:
        opts = {"num_cpus": 0, "scheduling_strategy": here}
    actor = ray.remote(RolloutEngine).options(runtime_env={"env_vars": env}, **opts).remote(**_engine_kwargs(spec))
    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor)
        raise ConfigError(
            f"config key 'engine.start_timeout_s': the rollout replica was not up after {timeout_s:g} s; it asks "
            f"for {opts.get('num_cpus')} CPU and {opts.get('num_gpus', 0)} GPU on this learner's node "
            f"(available now: {ray.available_resources()}). Free or add resources, or lower resources.cpus_per_actor"
        ) from None
    return actor


def make_sync(spec: EngineSpec, *, rank: int, run_id: str):
    """The learner-side weight sync for a replica built from `spec` (its backend, its tp world size)."""
    from apo_ray.rollout.weight_sync import make_weight_sync

    if spec.weight_sync not in ("shm", "local", "ipc", "nccl"):
        raise ValueError(f"engine spec has no weight-sync backend (weight_sync={spec.weight_sync!r})")
    return make_weight_sync(spec.weight_sync, rank=rank, run_id=run_id, engine_world_size=spec.tensor_parallel_size)
