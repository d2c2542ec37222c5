"""Evaluate a model on the eval prompts through a pool of `EvalWorker` actors; write report.json.

    python jobs/eval.py --config demo eval.model_path=runs/demo/train/final

`evaluate(model_path, rows, cfg, ref_path=...)` returns the report; `run(cfg)` also writes
eval.output_dir/report.json and prints a table.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

from apo_ray.config import Config, to_dict
from apo_ray.errors import ConfigError
from apo_ray.evaluation.metrics import aggregate, format_table
from apo_ray.evaluation.worker import EvalPlan, EvalWorker
from apo_ray.launch import check_pool_fits, engine_spec, fan_out, pool_item
from apo_ray.model import check_model, resolve_eval_model, same_model
from apo_ray.rewards import checked_reward
from apo_ray.runtime import init_ray, resolve_device, resolve_dtype, versions, worker_env
from apo_ray.storage import check_writable, fs_write_json, open_output

log = logging.getLogger("apo_ray.evaluation")

CHUNK_MIN, CHUNK_MAX = 16, 256  # prompts per actor call
LOG_EVERY_S = 10.0


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray Data hands back) -> Python values; NaN -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _split_too_long(model_path: str, rows: list[dict], max_prompt_tokens: int) -> tuple[list[dict], list[dict]]:
    from transformers import AutoTokenizer

    from apo_ray.data import prompt_token_counts

    lengths = prompt_token_counts(AutoTokenizer.from_pretrained(model_path), [r["prompt"] for r in rows])
    keep = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    return keep, [r for r, n in zip(rows, lengths) if n > max_prompt_tokens]


def _run_pool(cfg: Config, plan: EvalPlan, rows: list[dict]) -> list[dict]:
    actors = cfg.eval.num_actors
    chunk = min(CHUNK_MAX, max(CHUNK_MIN, -(-len(rows) // (2 * actors))))
    items = [pool_item(rows[s : s + chunk], start=s) for s in range(0, len(rows), chunk)]
    records = [
        {key: _plain(v) for key, v in row.items()}
        for row in fan_out(
            cfg,
            plan.device,
            EvalWorker,
            {"plan": plan},
            items,
            min_actors=1,
            max_actors=actors,
            env=worker_env(cfg, plan.device),
            label="eval",
            total_prompts=len(rows),
            log_every_s=LOG_EVERY_S,
        )
    ]
    return sorted(records, key=lambda r: r["index"])


def evaluate(model_path: str, rows: Sequence[dict], cfg: Config, *, ref_path: Optional[str] = None) -> dict:
    """Evaluate one model on prompt rows; returns the report (not written anywhere).

    Args:
        model_path: anything `resolve_eval_model` accepts.
        rows: prompt rows ``{prompt_id, prompt, answer, ...}``; the first eval.max_prompts are used.
        cfg: the job config (sampling.max_tokens/seed, eval.k/kl_samples/num_actors, engine, resources).
        ref_path: the KL reference (default model.path).

    Returns:
        The report: model, reference, metrics (`aggregate`), k, kl_same_model, timings,
        per_prompt records and the resolved config.
    """
    t0 = time.time()
    model = resolve_eval_model(model_path)
    ref = resolve_eval_model(ref_path or cfg.model.path, key="model.path")
    check_model(model, cfg, key="eval.model_path")
    rows = list(rows)[: cfg.eval.max_prompts] if cfg.eval.max_prompts is not None else list(rows)
    s = cfg.sampling
    keep, too_long = _split_too_long(model, rows, s.max_prompt_tokens)
    if not keep:
        raise ConfigError(
            f"eval: no prompts to evaluate ({len(rows)} given, {len(too_long)} longer than sampling.max_prompt_tokens)"
        )
    reward = checked_reward(cfg.data.task, cfg.reward.fn, keep[0]["answer"])  # before any actor starts
    fixed_size = init_ray(cfg.resources) != "cluster"
    device = resolve_device(cfg.resources)
    if fixed_size:
        check_pool_fits(cfg, device, 1, "resources.cpus_per_actor")
    dtype = resolve_dtype(cfg.model.dtype, device)
    plan = EvalPlan(
        model_path=model,
        ref_path=ref,
        kl_same_model=same_model(model, ref),
        dtype=dtype,
        device=device,
        reward_fn=reward,
        engine=engine_spec(cfg, model_path=model, dtype=dtype, seed=s.seed),
        max_tokens=s.max_tokens,
        k=cfg.eval.k,
        kl=cfg.eval.kl_samples,
        seed=s.seed,
    )
    log.info("eval: %d prompts (k=%d, kl=%s), model %s on %s", len(keep), plan.k, plan.kl, model, device)
    records = _run_pool(cfg, plan, keep)
    records += [{"prompt_id": r["prompt_id"], "skipped": "too_long"} for r in too_long]
    metrics = aggregate(records, plan.k)
    busy_s = sum(r.get("seconds") or 0.0 for r in records)
    per_prompt = []
    for r in records:
        rec = {"prompt_id": r["prompt_id"]}
        if r["skipped"]:
            rec["skipped"] = r["skipped"]
        else:
            rec.update(completion=r["completion"], correct=bool(r["correct"]), response_tokens=r["response_tokens"])
            if plan.k > 1:
                rec["num_correct"] = r["num_correct"]
            if plan.kl:
                rec["log_ratio"] = r["log_ratio"]
                if r.get("engine_gap") is not None:
                    rec["engine_gap"] = r["engine_gap"]
            if r["reward_error"]:
                rec["reward_error"] = r["reward_error"]
        per_prompt.append(rec)
    return {
        "model": model,
        "reference": ref,
        **metrics,
        "k": plan.k,
        "kl_same_model": plan.kl_same_model if plan.kl else None,
        "reward_fn": plan.reward_fn,
        "reward_errors": sum(1 for r in records if r.get("reward_error")),
        "too_long_prompt_ids": [r["prompt_id"] for r in too_long],
        "device": device,
        "dtype": plan.dtype,
        "seconds": time.time() - t0,
        "timings": {
            "engine_start_s": max((r.get("init_s") or 0.0 for r in records), default=0.0),
            "actor_busy_s": busy_s,
            "per_prompt_s": busy_s / len(keep),
        },
        "per_prompt": per_prompt,
        "versions": versions(),
        "config": to_dict(cfg),
    }


def run(cfg: Config) -> dict:
    """Evaluate eval.model_path (else model.path) on the eval prompts; writes eval.output_dir/report.json."""
    from apo_ray.data import load_prompts

    fs, out = open_output(cfg.eval.output_dir, "eval.output_dir")
    check_writable(fs, out, "eval.output_dir")  # fail before any actor starts
    key = "eval.model_path" if cfg.eval.model_path else "model.path"
    model = resolve_eval_model(cfg.eval.model_path or cfg.model.path, key=key)
    prompts = load_prompts(cfg.data, "eval")
    if prompts.skipped:
        log.warning("skipped %d bad prompt rows (data.on_bad_row=skip)", prompts.skipped)
    report = evaluate(model, prompts.rows, cfg, ref_path=cfg.model.path)
    fs_write_json(fs, f"{out}/report.json", report)
    print(format_table(report))
    print(f"\nwrote {cfg.eval.output_dir.rstrip('/')}/report.json")
    return report
