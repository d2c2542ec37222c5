"""Stage 1: estimate V*(x) from N reference-policy samples per prompt, as a Ray Data job.

    python jobs/vstar.py --config demo [key=value ...]
    ray job submit --working-dir . -- python jobs/vstar.py --config gsm8k_qwen2.5_1.5b

The prompt set is cut into fixed shards of `vstar.shard_size` prompts (in dataset
order). The shards form a Ray Dataset that `map_batches` fans over an autoscaling
pool of `ShardSampler` actors (`ActorPoolStrategy(min_size, max_size)`), each owning
one vLLM engine. An actor samples N completions per prompt in one request
(`SamplingParams(n=N)`), scores them with the reward function, computes
V* = beta1 * (logsumexp(r / beta1) - log N) with `apo_ray.algo.vstar`, and writes
the shard's parquet file itself. The shard is the unit of work and of resume:

- shard names are deterministic (`shard-00003.parquet`), written atomically (the
  parquet file is the commit point, its stats sidecar is written first);
- re-running the same command redoes only missing shards, so the output never
  holds a prompt twice; a finished output is not recomputed unless vstar.overwrite;
- `plan.json` pins what the shards were computed with; a different config on the
  same directory is refused rather than mixed;
- `.lock` keeps a second job from writing the same directory.

The reward that scores Stage 1 is vstar.reward_fn, or reward.fn when that is unset (the default:
the same rule as Stage 2); the manifest records it as `reward_fn` and Stage 2 checks it against its
own config. The GSM8K paper configs score Stage 1 with the official code's looser "gsm8k_flexible"
and Stage 2 with its "gsm8k_strict", as the paper's code did. We do not use `ray.data.llm` because
its vLLM stage keeps only the first completion when n > 1.

`run` is a sequence of phases (`check`, `open_job`, `sample`, `close`) that `apo_ray.pipeline` also
drives, running Stage 2's start-up between them and watching each shard land (`sample`'s on_shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apo_ray.config import Config, to_dict, to_yaml, vstar_reward
from apo_ray.errors import ConfigError
from apo_ray.launch import EngineSpec, build_engine, check_pool_fits, engine_spec, fan_out, pool_item
from apo_ray.model import check_model, resolve_model
from apo_ray.runtime import init_ray, resolve_device, resolve_dtype, versions, worker_env
from apo_ray.storage import (
    OutputLock,
    check_writable,
    fs_exists,
    fs_read_json,
    fs_write_bytes,
    fs_write_json,
    get_fs,
    open_output,
    remove_partial_writes,
)

log = logging.getLogger("apo_ray.vstar")


def call_seed(seed: int, shard: int, shard_size: int, chunk_start: int, n: int) -> int:
    """The seed of one engine call: prompt `chunk_start + i` of shard `shard` gets its N samples the
    seeds ``seed + k * n + j`` (k its position in the whole set; the engine adds ``i * n + j``), so
    no two samples of a Stage 1 run share a random stream, across prompts, chunks and shards."""
    return seed + (shard * shard_size + chunk_start) * n


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def stats_name(i: int) -> str:
    return f"_stats/shard-{i:05d}.json"


@dataclass(frozen=True)
class Stage1Plan:
    """Values derived from the config for one Stage 1 run (never written back into it)."""

    model_path: str
    dtype: str
    device: str
    reward_fn: str
    engine: EngineSpec
    num_shards: int
    plan_hash: str


# ---------------------------------------------------------------- the actor


class ShardSampler:
    """Ray Data callable class: one vLLM engine; each input row is one shard to sample, score and write."""

    def __init__(self, cfg_dict: dict, plan: Stage1Plan, out_uri: str):
        from transformers import AutoTokenizer

        from apo_ray.config import config_from_dict
        from apo_ray.rewards import RewardScorer, get_reward_fn

        self.cfg = config_from_dict(cfg_dict)
        self.plan = plan
        self.fs, self.out = get_fs(out_uri)
        self.scorer = RewardScorer(get_reward_fn(plan.reward_fn), plan.reward_fn)
        self.engine = build_engine(plan.engine)
        self.tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
        self._metrics = _Stage1Metrics()

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "prompts": [], "rows": [], "tokens": [], "seconds": []}
        for i, shard in enumerate(batch["shard"]):
            stats = self._do_shard(
                int(shard), list(batch["prompt_id"][i]), list(batch["prompt"][i]), list(batch["answer"][i])
            )
            for k in out:
                out[k].append(stats[k])
        return out

    def _do_shard(self, shard: int, ids: list[str], prompts: list[str], answers: list[str]) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from apo_ray.algo import vstar
        from apo_ray.data import prompt_token_counts

        cfg, s = self.cfg, self.cfg.sampling
        t0 = time.perf_counter()
        n = cfg.vstar.num_samples
        lengths = prompt_token_counts(self.tokenizer, prompts)
        keep = [j for j, length in enumerate(lengths) if length <= s.max_prompt_tokens]
        too_long = [ids[j] for j, length in enumerate(lengths) if length > s.max_prompt_tokens]
        rewards, completions, tokens = [], [], 0
        self.scorer.reset()
        bs = cfg.vstar.batch_size
        for c0 in range(0, len(keep), bs):
            chunk = keep[c0 : c0 + bs]
            results = self.engine.generate(
                [prompts[j] for j in chunk],
                n=n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=call_seed(s.seed, shard, cfg.vstar.shard_size, c0, n),
            )
            for j, res in zip(chunk, results):
                tokens += sum(len(c.token_ids) for c in res.completions)
                rewards.append([self.scorer(c.text, answers[j], where=f"prompt {ids[j]}") for c in res.completions])
                completions.append([c.text for c in res.completions])
        errors, first_error = self.scorer.reset()
        r_PN = np.asarray(rewards, dtype=np.float64).reshape(len(keep), n)
        v_P = vstar(r_PN, cfg.vstar.beta1) if len(keep) else np.zeros(0)
        solvable = r_PN.max(axis=1) > 0 if len(keep) else np.zeros(0, dtype=bool)
        drop = cfg.vstar.filter_unsolvable
        rows = [k for k in range(len(keep)) if solvable[k] or not drop]
        filtered = [ids[keep[k]] for k in range(len(keep)) if drop and not solvable[k]]
        cols = {
            "prompt_id": pa.array([ids[keep[k]] for k in rows], pa.string()),
            "prompt": pa.array([prompts[keep[k]] for k in rows], pa.string()),
            "answer": pa.array([answers[keep[k]] for k in rows], pa.string()),
            "rewards": pa.array([r_PN[k].tolist() for k in rows], pa.list_(pa.float64())),
            "vstar": pa.array([float(v_P[k]) for k in rows], pa.float64()),
            "pass_rate": pa.array([float(r_PN[k].mean()) for k in rows], pa.float64()),
        }
        if cfg.vstar.keep_completions:
            cols["completions"] = pa.array([completions[k] for k in rows], pa.list_(pa.string()))
        seconds = time.perf_counter() - t0
        stats = {
            "shard": shard,
            "prompts": len(ids),
            "rows": len(rows),
            "filtered_prompt_ids": filtered,
            "too_long_prompt_ids": too_long,
            "reward_errors": errors,
            "first_reward_error": first_error,
            "completions": len(keep) * n,
            "tokens": tokens,
            "reward_sum": float(r_PN.sum()),
            "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this actor, so far
            "node": _node_id(),
        }
        # The stats sidecar first, the parquet file last: a shard counts as done iff its parquet file exists.
        fs_write_json(self.fs, f"{self.out}/{stats_name(shard)}", stats)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), sink)
        fs_write_bytes(self.fs, f"{self.out}/{shard_name(shard)}", sink.getvalue().to_pybytes())
        self._metrics.record(len(ids), len(keep) * n, tokens, seconds, float(r_PN.mean()) if len(keep) else 0.0)
        return stats


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class _Stage1Metrics:
    """Ray dashboard metrics (ray.util.metrics), exported by every sampler actor."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self.prompts = Counter("apo_vstar_prompts_done", description="Stage 1 prompts sampled and scored")
        self.completions = Counter("apo_vstar_completions", description="Stage 1 completions generated")
        self.tokens_per_s = Gauge("apo_vstar_tokens_per_s", description="Stage 1 generated tokens/s (last shard)")
        self.reward_mean = Gauge("apo_vstar_reward_mean", description="Stage 1 mean reward (last shard)")

    def record(self, prompts: int, completions: int, tokens: int, seconds: float, reward_mean: float) -> None:
        self.prompts.inc(prompts)
        if completions:
            self.completions.inc(completions)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.reward_mean.set(reward_mean)


# ---------------------------------------------------------------- the driver


def make_plan(
    cfg: Config, model_path: str, device: str, fingerprint: str, num_prompts: int, reward: str
) -> tuple[Stage1Plan, dict]:
    """The derived plan, and the settings it pins (their hash names the plan)."""
    v = cfg.vstar
    pinned = {
        "model": model_path,
        "num_samples": v.num_samples,
        "beta1": repr(v.beta1),
        "sampling": to_dict(cfg)["sampling"],
        "reward_fn": reward,
        "dataset_fingerprint": fingerprint,
        "shard_size": v.shard_size,
        "filter_unsolvable": v.filter_unsolvable,
        "keep_completions": v.keep_completions,
    }
    dtype = resolve_dtype(cfg.model.dtype, device)
    plan = Stage1Plan(
        model_path=model_path,
        dtype=dtype,
        device=device,
        reward_fn=reward,
        engine=engine_spec(cfg, model_path=model_path, dtype=dtype, seed=cfg.sampling.seed),
        num_shards=(num_prompts + v.shard_size - 1) // v.shard_size,
        plan_hash=hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:16],
    )
    return plan, pinned


def _prepare_output(fs, out: str, uri: str, plan: Stage1Plan, pinned: dict, overwrite: bool) -> set[int]:
    """Check plan.json against this run; return the shards already done."""
    plan_path = f"{out}/plan.json"
    if overwrite:
        for name in [shard_name(i) for i in range(plan.num_shards)] + ["manifest.json", "plan.json"]:
            if fs_exists(fs, f"{out}/{name}"):
                fs.delete_file(f"{out}/{name}")
        if fs_exists(fs, f"{out}/_stats"):
            fs.delete_dir(f"{out}/_stats")
    done = {i for i in range(plan.num_shards) if fs_exists(fs, f"{out}/{shard_name(i)}")}
    if fs_exists(fs, plan_path) and not done and not fs_exists(fs, f"{out}/manifest.json"):
        log.info("replacing %s/plan.json: no shard was written under it", uri)  # a run that failed early
        fs.delete_file(plan_path)
    if fs_exists(fs, plan_path):
        old = fs_read_json(fs, plan_path)
        if old.get("plan_hash") != plan.plan_hash:
            changed = sorted(k for k in pinned if old.get("pinned", {}).get(k) != pinned[k])
            raise ConfigError(
                f"vstar.output_dir {uri!r} holds V* computed with a different configuration "
                f"(differs in: {', '.join(changed) or 'unknown'}). Use vstar.overwrite=true or another directory."
            )
    else:
        fs_write_json(fs, plan_path, {"plan_hash": plan.plan_hash, "pinned": pinned})
    fs.create_dir(f"{out}/_stats", recursive=True)
    remove_partial_writes(fs, out)
    return done


@dataclass
class Stage1Job:
    """One Stage 1 run, in the phases a driver may interleave with other work (`apo_ray.pipeline`):
    `check` (no Ray) -> `open_job` (lock, plan; Ray up) -> `sample` -> `close` (the lock)."""

    cfg: Config
    uri: str
    fs: Any
    out: str
    model_path: str
    prompts: Any  # apo_ray.data.PromptSet: the training prompts
    reward: str  # Stage 1's reward spec, checked
    t_start: float
    lock: OutputLock | None = None
    plan: Stage1Plan | None = None
    pinned: dict | None = None  # the settings make_plan pinned (checked against plan.json)
    reused: dict | None = None  # the manifest of a complete output of this plan: nothing to sample
    done: set[int] = field(default_factory=set)  # shards already written (a resumed run)


def check(cfg: Config) -> Stage1Job:
    """Every Stage 1 check that needs no Ray: the output is writable, the model readable, the prompts
    load, the reward keeps its contract."""
    from apo_ray.data import load_prompts
    from apo_ray.rewards import checked_reward

    t_start = time.time()
    uri = cfg.vstar.output_dir
    fs, out = open_output(uri, "vstar.output_dir")
    check_writable(fs, out, "vstar.output_dir")  # fail before any actor starts
    model_path = resolve_model(cfg.model.path)
    check_model(model_path, cfg)
    prompts = load_prompts(cfg.data, "train")
    if prompts.skipped:
        log.warning("skipped %d bad prompt rows (data.on_bad_row=skip)", prompts.skipped)
    reward_key, reward_fn = vstar_reward(cfg)
    reward = checked_reward(cfg.data.task, reward_fn, prompts.rows[0]["answer"], key=reward_key)
    return Stage1Job(cfg, uri, fs, out, model_path, prompts, reward, t_start)


def open_job(job: Stage1Job, device: str, prepare: bool = True) -> None:
    """Take the output's lock (released by `close`) and pin the plan: a complete output of the same
    plan is reused (`job.reused`), one of another plan refused. Call once Ray is up. With
    prepare=False nothing is written yet (a driver with more checks to make calls `prepare_output`)."""
    cfg, fs, out = job.cfg, job.fs, job.out
    lock = OutputLock(fs, out, job.uri)
    lock.acquire()
    job.lock = lock  # only once taken: `close` releases what this job holds
    job.plan, job.pinned = make_plan(cfg, job.model_path, device, job.prompts.fingerprint, len(job.prompts), job.reward)
    if fs_exists(fs, f"{out}/manifest.json") and not cfg.vstar.overwrite:
        manifest = fs_read_json(fs, f"{out}/manifest.json")
        if manifest.get("plan_hash") == job.plan.plan_hash and manifest.get("complete"):
            rows = manifest["counts"]["rows_written"]
            log.info("V* already complete in %s (%d rows); vstar.overwrite=true recomputes", job.uri, rows)
            job.reused = manifest
            return
    if prepare:
        prepare_output(job)


def prepare_output(job: Stage1Job) -> None:
    """The output made ready for `sample` (the shards of a resumed run kept, or all of them removed
    with vstar.overwrite=true) and config.yaml written; a no-op when a complete output is reused."""
    if job.reused is None:
        job.done = _prepare_output(job.fs, job.out, job.uri, job.plan, job.pinned, job.cfg.vstar.overwrite)
        fs_write_bytes(job.fs, f"{job.out}/config.yaml", to_yaml(job.cfg).encode())


def sample(job: Stage1Job, on_shard: Callable[[int], None] | None = None) -> dict:
    """Sample, score and write the shards not yet done; returns the manifest (also in manifest.json).

    Args:
        on_shard: called at the driver with the index of each shard as it is complete on storage,
            first those a previous run wrote; not called when a complete output is reused.
    """
    if job.reused is not None:
        return job.reused
    cfg, plan = job.cfg, job.plan
    todo = [i for i in range(plan.num_shards) if i not in job.done]
    log.info(
        "Stage 1: %d prompts, %d shards (%d already done), N=%d, model %s on %s",
        len(job.prompts),
        plan.num_shards,
        len(job.done),
        cfg.vstar.num_samples,
        job.model_path,
        plan.device,
    )
    for i in sorted(job.done) if on_shard else ():
        on_shard(i)
    t_gen = time.time()
    if todo:
        _run_shards(cfg, plan, job.uri, job.prompts.rows, todo, plan.device, on_shard)
    gen_s = time.time() - t_gen
    manifest = _write_manifest(cfg, plan, job.fs, job.out, job.prompts, job.t_start, gen_s)
    _check_reward_errors(cfg, plan, job.fs, job.out, manifest)
    log.info(
        "Stage 1 done: %d rows in %s (%.1f s, %.1f prompts/s, %.0f tokens/s)",
        manifest["counts"]["rows_written"],
        job.uri,
        manifest["wall_time_s"],
        manifest["prompts_per_s"],
        manifest["generated_tokens_per_s"],
    )
    return manifest


def close(job: Stage1Job) -> None:
    if job.lock is not None:
        job.lock.release()
        job.lock = None


def run(cfg: Config) -> dict:
    """Run Stage 1 end to end; returns the manifest (also written to vstar.output_dir/manifest.json)."""
    job = check(cfg)
    try:
        fixed_size = init_ray(cfg.resources) != "cluster"
        device = resolve_device(cfg.resources)
        if fixed_size:
            check_pool_fits(cfg, device, cfg.vstar.min_actors, "vstar.min_actors")
        open_job(job, device)
        return sample(job)
    finally:
        close(job)


def _run_shards(
    cfg: Config,
    plan: Stage1Plan,
    uri: str,
    rows: list[dict],
    todo: list[int],
    device: str,
    on_shard: Callable[[int], None] | None,
) -> None:
    size = cfg.vstar.shard_size
    items = [pool_item(rows[i * size : (i + 1) * size], shard=i) for i in todo]
    for row in fan_out(
        cfg,
        device,
        ShardSampler,
        {"cfg_dict": to_dict(cfg), "plan": plan, "out_uri": uri},
        items,
        min_actors=cfg.vstar.min_actors,
        max_actors=cfg.vstar.max_actors,
        env=worker_env(cfg, device),
        label="Stage 1",
        total_prompts=sum(len(it["prompt_id"]) for it in items),
        count=lambda row: (int(row["prompts"]), int(row["tokens"])),
        log_every_s=cfg.vstar.log_every_s,
    ):
        if on_shard is not None:  # each shard is written by its actor before its row comes back
            on_shard(int(row["shard"]))


def _check_reward_errors(cfg: Config, plan: Stage1Plan, fs, out: str, manifest: dict) -> None:
    """Fail when too many completions could not be scored: their V* would be built on zeros.

    The shards that hold reward errors are deleted (and the manifest marked incomplete), so the
    rerun with a fixed reward function redoes exactly those.
    """
    counts = manifest["counts"]
    rate = counts["reward_errors"] / max(counts["completions"], 1)
    if rate <= cfg.vstar.max_reward_error_rate:
        return
    for i in range(plan.num_shards):
        if fs_read_json(fs, f"{out}/{stats_name(i)}")["reward_errors"]:
            fs.delete_file(f"{out}/{shard_name(i)}")
    manifest["complete"] = False
    fs_write_json(fs, f"{out}/manifest.json", manifest)
    raise ConfigError(
        f"config key '{vstar_reward(cfg)[0]}': {plan.reward_fn!r} raised on {counts['reward_errors']} of {counts['completions']} "
        f"completions ({rate:.1%}, more than vstar.max_reward_error_rate={cfg.vstar.max_reward_error_rate}); "
        f"first error: {manifest['first_reward_error']}"
    )


def _write_manifest(cfg: Config, plan: Stage1Plan, fs, out: str, prompts, t_start: float, gen_s: float) -> dict:
    counts = {
        "prompts_in": len(prompts),
        "bad_rows_skipped": prompts.skipped,
        "rows_written": 0,
        "filtered": 0,
        "too_long": 0,
        "reward_errors": 0,
        "completions": 0,
        "generated_tokens": 0,
    }
    filtered_ids, too_long_ids, first_error, reward_sum, shard_seconds = [], [], None, 0.0, 0.0
    actor_rss, nodes = 0.0, set()
    for i in range(plan.num_shards):
        st = fs_read_json(fs, f"{out}/{stats_name(i)}")
        actor_rss = max(actor_rss, st.get("peak_rss_mb", 0.0))
        nodes.add(st.get("node"))
        counts["rows_written"] += st["rows"]
        counts["reward_errors"] += st["reward_errors"]
        counts["completions"] += st["completions"]
        counts["generated_tokens"] += st["tokens"]
        filtered_ids += st["filtered_prompt_ids"]
        too_long_ids += st["too_long_prompt_ids"]
        first_error = first_error or st["first_reward_error"]
        reward_sum += st["reward_sum"]
        shard_seconds += st["seconds"]
    counts["filtered"], counts["too_long"] = len(filtered_ids), len(too_long_ids)
    wall = time.time() - t_start
    s = cfg.sampling
    manifest = {
        "complete": True,
        "plan_hash": plan.plan_hash,
        "model": plan.model_path,
        "dtype": plan.dtype,
        "device": plan.device,
        "num_samples": cfg.vstar.num_samples,
        "beta1": cfg.vstar.beta1 if cfg.vstar.beta1 != float("inf") else "inf",
        "sampling": {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "max_prompt_tokens": s.max_prompt_tokens,
            "seed": s.seed,
        },
        "reward_fn": plan.reward_fn,
        "dataset": {
            "task": cfg.data.task,
            "source": prompts.source,
            "split": cfg.data.train_split,
            "fingerprint": prompts.fingerprint,
        },
        "filter_unsolvable": cfg.vstar.filter_unsolvable,
        "counts": counts,
        "reward_mean": reward_sum / max(counts["completions"], 1),
        "first_reward_error": first_error,
        "filtered_prompt_ids": filtered_ids,
        "too_long_prompt_ids": too_long_ids,
        "shards": [shard_name(i) for i in range(plan.num_shards)],
        "wall_time_s": wall,
        "generation_wall_time_s": gen_s,
        # Summed over shards, inside the actors (generate + score + V* + write): the work, without
        # Ray Data planning and engine start-up. Equals the work time with one actor.
        "shard_seconds": shard_seconds,
        "actor_peak_rss_mb": actor_rss,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nodes": sorted(n for n in nodes if n),  # Ray node ids of the actors that wrote the shards
        "prompts_per_s": counts["prompts_in"] / max(wall, 1e-9),
        "generated_tokens_per_s": counts["generated_tokens"] / max(wall, 1e-9),
        "versions": versions(),
        "config": to_dict(cfg),
    }
    fs_write_json(fs, f"{out}/manifest.json", manifest)
    return manifest
