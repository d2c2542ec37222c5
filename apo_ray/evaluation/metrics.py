"""Evaluation metrics from per-prompt records: accuracy, pass@k, KL to the reference (pure Python)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional


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
            ``reward`` (float), ``response_tokens`` (int), ``num_correct`` (int, of k samples),
            ``log_ratio`` (float or None) and optionally ``engine_gap`` (float or None).
        k: samples per prompt for pass@k (1: no pass@k).

    Returns:
        num_prompts, num_skipped, accuracy, greedy_reward_mean, mean_response_tokens and, when
        available, pass_at_k, sample_accuracy (mean fraction of correct samples), kl_to_ref,
        kl_to_ref_stderr, engine_logprob_gap (mean |vLLM - transformers sequence log-prob| of the
        KL samples, which the KL itself does not contain). Means over zero prompts are None.
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
    out["engine_logprob_gap"] = _mean([abs(float(r["engine_gap"])) for r in done if r.get("engine_gap") is not None])
    return out


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
        if report.get("engine_logprob_gap") is not None:
            same += f" (vLLM vs transformers log-prob gap {num(report['engine_logprob_gap'], '.2g')}, not in the KL)"
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
