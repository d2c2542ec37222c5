"""Evaluation: greedy accuracy, pass@k and KL(pi || pi_ref) through a pool of vLLM actors.

    python jobs/eval.py --config demo eval.model_path=runs/demo/train/final
    apo-ray eval --config demo eval.model_path=runs/demo/train eval.k=8
    ray job submit --working-dir . -- python jobs/eval.py --config NAME eval.model_path=/shared/run/train

The model (eval.model_path, else model.path) may be "tiny", a hub id, an HF model
directory, a Stage 2 checkpoint directory (holds ``hf/``) or a train.output_dir (holds
``final/``); `resolve_eval_model` picks the HF directory. The reference for the KL is
model.path. `run(cfg)` writes eval.output_dir/report.json and prints a table;
`evaluate(model_path, rows, cfg, ref_path=...)` is the same without the file (the demo
calls it before and after training, in one Ray session: nothing here shuts Ray down).

The prompts are cut into fixed chunks that a Ray Dataset fans over an autoscaling pool
of `EvalWorker` actors (`map_batches` + `ActorPoolStrategy`, the Stage 1 pattern). Each
actor owns one vLLM engine and, when the KL is measured against another model, the
reference loaded with transformers. Per prompt it computes:

- greedy correctness: temperature 0, one completion, judged by the reward function
  (correct: reward >= 1; the verifiable rewards are 0/1);
- pass@k (eval.k > 1): k completions at temperature 1; with n = k samples the unbiased
  estimator 1 - C(n-c, k) / C(n, k) is "any of the k is correct";
- the sequence log-ratio sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] of one completion
  y ~ pi at temperature 1 (eval.kl_samples): log pi is the engine's sampled-token log-prob,
  log pi_ref a transformers forward over prompt + response. KL(pi || pi_ref) is estimated
  by its mean over prompts (the paper's metric), reported with its standard error.

Seeds: the j-th sample of the i-th evaluated prompt uses seed sampling.seed + i * n + j
(n samples per prompt; the engine's convention), so results depend neither on chunking
nor on the number of actors.

Choices and departures: pass@k and the KL sample use temperature 1 and top_p 1 whatever
sampling.* says (the KL is of the policy itself, not of a truncated sampler). With k > 1
the KL reuses the first of the k samples (a sample of pi like any other) rather than
drawing one more. When the evaluated model is the reference (same resolved path) the
reference is not loaded and kl_to_ref is exactly 0 with ``kl_same_model: true``; a copy
of the same weights at another path goes the honest way, and its KL then shows the
vLLM-vs-transformers numerical gap. Prompts longer than sampling.max_prompt_tokens are
skipped and counted (as in Stage 1), not scored as wrong.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from apo_ray.config import TINY_MODEL, Config, ConfigError, is_local_path, to_dict
from apo_ray.utils import (
    check_writable,
    fs_write_json,
    get_fs,
    init_ray,
    resolve_device,
    resolve_dtype,
    resolve_model,
    versions,
    worker_env,
)

log = logging.getLogger("apo_ray.eval")

KL_MICRO_BATCH = 8  # sequences per reference forward (logits are [B, T, V])
CHUNK_MIN, CHUNK_MAX = 16, 256  # prompts per actor call
LOG_EVERY_S = 10.0


# ---------------------------------------------------------------- which model


def resolve_eval_model(path: str | os.PathLike, key: str = "eval.model_path") -> str:
    """The HF model (directory or hub id) that `path` designates.

    Args:
        path: "tiny"; a hub id (returned unchanged); an HF model directory (has config.json);
            a Stage 2 checkpoint directory (its ``hf/``); or a train.output_dir (its ``final/``).
        key: the config key named in errors.

    Returns:
        An absolute HF model directory, or the hub id.

    Raises:
        ConfigError: naming `key` and `path` when it does not exist or holds no model.
    """
    path = os.fspath(path)
    if path == TINY_MODEL:
        return resolve_model(path)
    if not is_local_path(path):
        return path  # a hub id: vLLM and transformers fetch it
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config key '{key}': model path {path!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"config key '{key}': model path {path!r} is not a directory")
    for cand in (p, p / "hf", p / "final"):
        if (cand / "config.json").is_file():
            return str(cand.resolve())
    ckpts = sorted({c.parent.parent for c in [*p.glob("*/hf/config.json"), *p.glob("*/*/hf/config.json")]})
    hint = f" It holds training checkpoints; evaluate one of them, e.g. {str(ckpts[-1])!r}." if ckpts else ""
    raise ConfigError(
        f"config key '{key}': {path!r} holds no model: expected an HF model directory (config.json), "
        f"a training checkpoint (hf/config.json) or a train.output_dir (final/config.json).{hint}"
    )


def same_model(a: str, b: str) -> bool:
    """Whether two resolved model locations are the same (same real path, or same hub id)."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# ---------------------------------------------------------------- pure metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def aggregate(records: Sequence[dict], k: int) -> dict:
    """Dataset metrics from per-prompt records (skipped prompts are counted, not scored).

    Args:
        records: dicts with ``skipped`` (str, "" if evaluated), ``correct`` (bool),
            ``reward`` (float), ``response_tokens`` (int), ``num_correct`` (int, of k samples)
            and ``log_ratio`` (float or None).
        k: samples per prompt for pass@k (1: no pass@k).

    Returns:
        num_prompts, num_skipped, accuracy, greedy_reward_mean, mean_response_tokens and, when
        available, pass_at_k, sample_accuracy (mean fraction of correct samples), kl_to_ref,
        kl_to_ref_stderr. Means over zero prompts are None.
    """
    done = [r for r in records if not r["skipped"]]
    out: dict[str, Any] = {
        "num_prompts": len(done),
        "num_skipped": len(records) - len(done),
        "accuracy": _mean([float(r["correct"]) for r in done]),
        "greedy_reward_mean": _mean([float(r["reward"]) for r in done]),
        "mean_response_tokens": _mean([float(r["response_tokens"]) for r in done]),
    }
    if k > 1:
        out["pass_at_k"] = _mean([pass_at_k(k, int(r["num_correct"]), k) for r in done])
        out["sample_accuracy"] = _mean([int(r["num_correct"]) / k for r in done])
    lr = [float(r["log_ratio"]) for r in done if r.get("log_ratio") is not None]
    out["kl_to_ref"] = _mean(lr)
    if len(lr) > 1:
        m = out["kl_to_ref"]
        out["kl_to_ref_stderr"] = math.sqrt(sum((x - m) ** 2 for x in lr) / (len(lr) - 1) / len(lr))
    else:
        out["kl_to_ref_stderr"] = 0.0 if lr else None
    return out


# ---------------------------------------------------------------- the actor


@dataclass(frozen=True)
class EvalPlan:
    """Values derived from the config for one evaluation (never written back into it)."""

    model_path: str
    ref_path: str
    kl_same_model: bool
    dtype: str
    device: str
    reward_fn: str
    max_model_len: int
    max_tokens: int
    k: int
    kl: bool
    seed: int


def reference_logprobs(model: Any, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
    """sum_t log pi_ref(y_t | x, y_<t) for each (x, y), one forward per micro-batch (right-padded).

    Args:
        model: a transformers causal LM (eval mode).
        prompt_ids: token ids of each prompt x (non-empty).
        response_ids: token ids of each response y (may be empty: log-prob 0).
    """
    import torch

    from apo_ray.algo import token_logprobs

    device = next(model.parameters()).device
    out: list[float] = []
    for b0 in range(0, len(prompt_ids), KL_MICRO_BATCH):
        prompts, responses = prompt_ids[b0 : b0 + KL_MICRO_BATCH], response_ids[b0 : b0 + KL_MICRO_BATCH]
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        ids_BT = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask_BT = torch.zeros_like(ids_BT)
        for i, s in enumerate(seqs):
            ids_BT[i, : len(s)] = torch.tensor(s)
            mask_BT[i, : len(s)] = 1
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        with torch.no_grad():
            logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
            logp_BT = token_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:])  # logp_BT[:, t] scores token t + 1
        for i, (p, r) in enumerate(zip(prompts, responses)):
            out.append(float(logp_BT[i, len(p) - 1 : len(p) - 1 + len(r)].sum()))
    return out


class EvalWorker:
    """Ray Data callable class: one vLLM engine (+ the reference on demand); each input row is a chunk of prompts."""

    def __init__(self, cfg_dict: dict, plan: EvalPlan):
        t0 = time.perf_counter()
        from apo_ray.config import config_from_dict
        from apo_ray.rewards import get_reward_fn
        from apo_ray.rollout.engine import RolloutEngine

        e = config_from_dict(cfg_dict).engine
        self.plan = plan
        self.reward_fn = get_reward_fn(plan.reward_fn)
        self.engine = RolloutEngine(
            plan.model_path,
            dtype=plan.dtype,
            max_model_len=plan.max_model_len,
            seed=plan.seed,
            tensor_parallel_size=e.tensor_parallel_size,
            gpu_memory_utilization=e.gpu_memory_utilization,
            enforce_eager=e.enforce_eager,
            max_num_seqs=e.max_num_seqs,
        )
        self.ref = None
        if plan.kl and not plan.kl_same_model:
            import torch
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(plan.ref_path, dtype=getattr(torch, plan.dtype))
            self.ref = ref.to("cuda" if plan.device == "cuda" else "cpu").eval()
        self.init_s = time.perf_counter() - t0  # reported once, with this actor's first record
        log.info("eval actor ready in %.1f s (reference loaded: %s)", self.init_s, self.ref is not None)

    def __call__(self, batch: dict) -> dict:
        cols: dict[str, list] = {}
        for i, start in enumerate(batch["start"]):
            recs = self.evaluate_chunk(
                int(start), list(batch["prompt_id"][i]), list(batch["prompt"][i]), list(batch["answer"][i])
            )
            for rec in recs:
                for key, value in rec.items():
                    cols.setdefault(key, []).append(value)
        return cols

    def _score(self, text: str, answer: str) -> tuple[float, str]:
        try:
            return float(self.reward_fn(text, answer)), ""
        except Exception as e:  # noqa: BLE001 - a failing reward scores 0 and is reported per prompt
            return 0.0, f"{type(e).__name__}: {e}"

    def evaluate_chunk(self, start: int, ids: list[str], prompts: list[str], answers: list[str]) -> list[dict]:
        """Per-prompt records for prompts start, start+1, ... of the evaluated set."""
        t0 = time.perf_counter()
        p = self.plan
        greedy = self.engine.generate(prompts, n=1, temperature=0.0, max_tokens=p.max_tokens, seed=p.seed + start)
        n_samples = p.k if p.k > 1 else int(p.kl)
        sampled = None
        if n_samples:
            sampled = self.engine.generate(
                prompts,
                n=n_samples,
                temperature=1.0,
                top_p=1.0,
                max_tokens=p.max_tokens,
                seed=p.seed + start * n_samples,  # the engine gives prompt i of the call seed + i * n
                logprobs=p.kl,
            )
        log_ratios: list[Optional[float]] = [None] * len(prompts)
        if p.kl and sampled is not None:
            firsts = [res.completions[0] for res in sampled]
            if self.ref is None:  # the evaluated model is the reference
                log_ratios = [0.0] * len(prompts)
            else:
                ref_lp = reference_logprobs(
                    self.ref, [res.prompt_token_ids for res in sampled], [c.token_ids for c in firsts]
                )
                log_ratios = [sum(c.logprobs) - r for c, r in zip(firsts, ref_lp)]
        records = []
        for j, (res, answer) in enumerate(zip(greedy, answers)):
            comp = res.completions[0]
            reward, error = self._score(comp.text, answer)
            num_correct = -1
            if p.k > 1 and sampled is not None:
                num_correct = sum(self._score(c.text, answer)[0] >= 1.0 for c in sampled[j].completions)
            records.append(
                {
                    "index": start + j,
                    "prompt_id": ids[j],
                    "completion": comp.text,
                    "finish_reason": str(comp.finish_reason),
                    "reward": reward,
                    "correct": reward >= 1.0,
                    "reward_error": error,
                    "response_tokens": len(comp.token_ids),
                    "num_correct": num_correct,
                    "log_ratio": math.nan if log_ratios[j] is None else float(log_ratios[j]),
                    "seconds": 0.0,
                    "init_s": 0.0,
                    "skipped": "",
                }
            )
        if records:
            records[0]["seconds"] = time.perf_counter() - t0
            records[0]["init_s"], self.init_s = self.init_s, 0.0
        return records


# ---------------------------------------------------------------- the driver


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray Data hands back) -> Python values; NaN -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _split_too_long(model_path: str, rows: list[dict], max_prompt_tokens: int) -> tuple[list[dict], list[dict]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    lengths = [len(ids) for ids in tok([r["prompt"] for r in rows])["input_ids"]]
    keep = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    return keep, [r for r, n in zip(rows, lengths) if n > max_prompt_tokens]


def _run_pool(cfg: Config, plan: EvalPlan, rows: list[dict]) -> list[dict]:
    import ray

    actors = cfg.eval.num_actors
    chunk = min(CHUNK_MAX, max(CHUNK_MIN, -(-len(rows) // (2 * actors))))
    items = [
        {
            "start": s,
            "prompt_id": [r["prompt_id"] for r in rows[s : s + chunk]],
            "prompt": [r["prompt"] for r in rows[s : s + chunk]],
            "answer": [r["answer"] for r in rows[s : s + chunk]],
        }
        for s in range(0, len(rows), chunk)
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    remote_args: dict = {"runtime_env": {"env_vars": worker_env(cfg, plan.device)}}
    if plan.device == "cuda":
        # TP > 1: the engine uses vLLM's Ray executor, which reserves its own GPUs (untested here).
        remote_args.update(num_gpus=1 if cfg.engine.tensor_parallel_size == 1 else 0, num_cpus=1)
    else:
        remote_args.update(num_cpus=cfg.resources.cpus_per_actor)
    results = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "plan": plan},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **remote_args,
    )
    records: list[dict] = []
    t0 = last = time.time()
    for row in results.iter_rows():
        records.append({key: _plain(v) for key, v in row.items()})
        now = time.time()
        if now - last >= LOG_EVERY_S:
            last = now
            log.info(
                "eval progress: %d/%d prompts (%.1f prompts/s)", len(records), len(rows), len(records) / (now - t0)
            )
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
    if cfg.eval.num_actors < 1:
        raise ConfigError(f"config key 'eval.num_actors': must be >= 1, got {cfg.eval.num_actors}")
    model = resolve_eval_model(model_path)
    ref = resolve_eval_model(ref_path or cfg.model.path, key="model.path")
    rows = list(rows)[: cfg.eval.max_prompts] if cfg.eval.max_prompts is not None else list(rows)
    s = cfg.sampling
    keep, too_long = _split_too_long(model, rows, s.max_prompt_tokens)
    if not keep:
        raise ConfigError(
            f"eval: no prompts to evaluate ({len(rows)} given, {len(too_long)} longer than sampling.max_prompt_tokens)"
        )
    init_ray(cfg.resources)
    device = resolve_device(cfg.resources)
    from apo_ray.rewards import reward_fn_name

    plan = EvalPlan(
        model_path=model,
        ref_path=ref,
        kl_same_model=same_model(model, ref),
        dtype=resolve_dtype(cfg.model.dtype, device),
        device=device,
        reward_fn=reward_fn_name(cfg.data.task, cfg.reward.fn),
        max_model_len=s.max_prompt_tokens + s.max_tokens,
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


def format_table(report: dict) -> str:
    """A few lines a person reads: the headline metrics of a report."""

    def num(x: Optional[float], fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"model        {report['model']}",
        f"reference    {report['reference']}",
        f"prompts      {report['num_prompts']} evaluated, {report['num_skipped']} skipped (too long)",
        f"accuracy     {num(report['accuracy'])} (greedy)",
    ]
    if report["k"] > 1:
        lines.append(
            f"pass@{report['k']:<7} {num(report['pass_at_k'])} (sample accuracy {num(report['sample_accuracy'])})"
        )
    if report["kl_to_ref"] is not None:
        same = " (same model as the reference)" if report["kl_same_model"] else ""
        lines.append(
            f"KL to ref    {num(report['kl_to_ref'], '.4g')} +- {num(report['kl_to_ref_stderr'], '.2g')}{same}"
        )
    t = report["timings"]
    lines += [
        f"response     {num(report['mean_response_tokens'], '.1f')} tokens (greedy, mean)",
        f"time         {report['seconds']:.1f} s (engine start {t['engine_start_s']:.1f} s, "
        f"{1000 * t['per_prompt_s']:.1f} ms/prompt)",
    ]
    return "\n".join(lines)


def run(cfg: Config) -> dict:
    """Evaluate eval.model_path (else model.path) on the eval prompts; writes eval.output_dir/report.json."""
    from apo_ray.data import load_prompts

    fs, out = get_fs(cfg.eval.output_dir)
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
