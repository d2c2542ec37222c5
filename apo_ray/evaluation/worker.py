"""The evaluation actor: one vLLM engine (+ transformers copies of the model and its reference for the KL)
scoring chunks of prompts.

See `apo_ray.evaluation` for what is measured and how seeds are assigned.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from apo_ray.launch import EngineSpec, build_engine

log = logging.getLogger("apo_ray.evaluation")

KL_MICRO_BATCH = 8  # sequences per reference forward (logits are [B, T, V])


@dataclass(frozen=True)
class EvalPlan:
    """Values derived from the config for one evaluation (never written back into it)."""

    model_path: str
    ref_path: str
    kl_same_model: bool
    dtype: str
    device: str
    reward_fn: str
    engine: EngineSpec
    max_tokens: int
    k: int
    kl: bool
    seed: int


def sequence_logprobs(model: Any, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
    """sum_t log p(y_t | x, y_<t) under `model` for each (x, y), one forward per micro-batch (right-padded).

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


def kl_log_ratios(
    policy: Any,
    ref: Any,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    engine_logps: list[list[float]],
) -> tuple[list[float], list[float]]:
    """Per sequence: (log pi(y|x) - log pi_ref(y|x), engine gap), both log-probs from transformers.

    Both sides of the log-ratio come from the same engine (transformers, same dtype and device), so
    the numerical gap between vLLM and transformers does not enter the KL; it is returned apart as
    sum_t vLLM log pi(y_t) - sum_t transformers log pi(y_t) of the same tokens.

    Args:
        policy, ref: transformers causal LMs (eval mode): the evaluated model and the reference.
        prompt_ids, response_ids: token ids of each prompt x and its sampled response y.
        engine_logps: vLLM's log-prob of each sampled token under the policy.
    """
    logp_pi = sequence_logprobs(policy, prompt_ids, response_ids)
    logp_ref = sequence_logprobs(ref, prompt_ids, response_ids)
    ratios = [p - r for p, r in zip(logp_pi, logp_ref)]
    gaps = [sum(e) - p for e, p in zip(engine_logps, logp_pi)]
    return ratios, gaps


def _load_hf(path: str, plan: EvalPlan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, plan.dtype))
    return model.to("cuda" if plan.device == "cuda" else "cpu").eval()


class EvalWorker:
    """Ray Data callable class: one vLLM engine (+ transformers copies of the model and the reference when the KL
    is measured against another model); each input row is a chunk of prompts."""

    def __init__(self, plan: EvalPlan):
        t0 = time.perf_counter()
        from apo_ray.rewards import RewardScorer, get_reward_fn

        self.plan = plan
        self.scorer = RewardScorer(get_reward_fn(plan.reward_fn), plan.reward_fn)
        self.engine = build_engine(plan.engine)
        self.ref = self.policy = None
        if plan.kl and not plan.kl_same_model:  # both sides of the KL from transformers (`kl_log_ratios`)
            self.ref = _load_hf(plan.ref_path, plan)
            self.policy = _load_hf(plan.model_path, plan)
        self.init_s = time.perf_counter() - t0  # reported once, with this actor's first record
        log.info(
            "eval actor ready in %.1f s (transformers model + reference loaded: %s)", self.init_s, self.ref is not None
        )

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
        gaps: list[Optional[float]] = [None] * len(prompts)
        if p.kl and sampled is not None:
            firsts = [res.completions[0] for res in sampled]
            if self.ref is None:  # the evaluated model is the reference
                log_ratios = [0.0] * len(prompts)
            else:
                log_ratios, gaps = kl_log_ratios(
                    self.policy,
                    self.ref,
                    [res.prompt_token_ids for res in sampled],
                    [c.token_ids for c in firsts],
                    [c.logprobs for c in firsts],
                )
        records = []
        for j, (res, answer) in enumerate(zip(greedy, answers)):
            comp = res.completions[0]
            reward, error = self.scorer.score(comp.text, answer, where=f"prompt {ids[j]}")
            num_correct = -1
            if p.k > 1 and sampled is not None:
                num_correct = sum(
                    self.scorer(c.text, answer, where=f"prompt {ids[j]}") >= 1.0 for c in sampled[j].completions
                )
            records.append(
                {
                    "index": start + j,
                    "prompt_id": ids[j],
                    "completion": comp.text,
                    "finish_reason": str(comp.finish_reason),
                    "reward": reward,
                    "correct": reward >= 1.0,
                    "reward_error": error or "",
                    "response_tokens": len(comp.token_ids),
                    "num_correct": num_correct,
                    "log_ratio": math.nan if log_ratios[j] is None else float(log_ratios[j]),
                    "engine_gap": math.nan if gaps[j] is None else float(gaps[j]),
                    "seconds": 0.0,
                    "init_s": 0.0,
                    "skipped": "",
                }
            )
        if records:
            records[0]["seconds"] = time.perf_counter() - t0
            records[0]["init_s"], self.init_s = self.init_s, 0.0
        return records
