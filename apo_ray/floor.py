"""The floor: A*-PO in one plain process (HF generate, torch AdamW; no Ray, vLLM or DeepSpeed).

What every benchmark figure of apo-ray's fixed costs is divided by (`python jobs/bench.py floor`).
The floor does the same work as the pipeline, on the same model, prompts, reward and settings:

    floor = Floor(model_path, cfg)
    vstar_P, t = floor.vstar_pass(rows)          # Stage 1: N samples per prompt, scored, V*
    t = floor.step(rows_with_vstar, seed=...)    # Stage 2: 1 sample per prompt, scored, one AdamW step

Same maths as the learner: the batch is built with `RolloutBatch.from_sequences`, log-probs with
`aligned_logprobs`, the loss with `astar_po_loss` (sequence-level, normalised by the batch), the
gradient clipped to train.grad_clip, torch's AdamW with train.lr / train.weight_decay and betas
(0.9, 0.999). What the floor leaves out, because a one-process trainer does not need it: the
weight sync (the sampler is the policy), the engine-vs-learner log-prob check and the entropy
statistic. Sampling is HF ``generate`` with a KV cache, ``top_k=0`` (HF's default top_k of 50
would truncate the distribution vLLM samples from), left padding, one batch per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from apo_ray.config import Config


@dataclass
class Sampled:
    """One ``generate`` call: per sequence, the prompt's ids, the response's ids (EOS included) and text."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]


def split_responses(out_BT: torch.Tensor, prompt_len: int, eos_id: int) -> list[list[int]]:
    """The response of each row of HF ``generate``'s output, up to and including the first EOS.

    Args:
        out_BT: generate's output (prompt columns, then the new tokens; rows that stopped early
            are filled with padding after their EOS).
        prompt_len: width of the (left-padded) prompt columns.
        eos_id: the stop token (kept, as vLLM keeps it in ``token_ids``).
    """
    out = []
    for row in out_BT[:, prompt_len:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out


def check_floor_config(cfg: Config) -> None:
    """The floor implements one optimizer step per step on the whole batch in float32, with no
    warm-up and no entropy bonus: a config asking for more would make its ratio unfair.

    Raises:
        ConfigError: naming the key the floor does not implement.
    """
    from apo_ray.errors import ConfigError

    t = cfg.train
    unsupported = {
        "train.algo": t.algo != "astar_po",
        "train.mini_batch_size": t.mini_batch_size != t.rollout_batch_size,
        "train.warmup_steps": t.warmup_steps > 0,
        "train.entropy_coef": t.entropy_coef > 0,
        "model.dtype": cfg.model.dtype not in ("auto", "float32"),
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(
                f"config key '{key}': the floor (jobs/bench.py floor/sweep) implements A*-PO with one float32 "
                "optimizer step per step, no warm-up and no entropy bonus; bench a config without it"
            )


class Floor:
    """The one-process A*-PO trainer: policy, frozen reference, AdamW, reward.

    Args:
        model_path: HF model dir (float32).
        cfg: sampling (temperature, top_p, max_tokens), vstar (num_samples, beta1, batch_size),
            train (lr, weight_decay, grad_clip, beta2) and the reward of data.task / reward.fn are read.
        threads: torch threads (None: torch's default, every core of the machine).
    """

    def __init__(self, model_path: str, cfg: Config, *, threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from apo_ray.rewards import RewardScorer, get_reward_fn, reward_fn_name

        check_floor_config(cfg)
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).requires_grad_(False).eval()
        t = cfg.train
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))
        name = reward_fn_name(cfg.data.task, cfg.reward.fn)
        self.scorer = RewardScorer(get_reward_fn(name), name)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.start_s = time.perf_counter() - t0

    @torch.no_grad()
    def sample(self, prompts: list[str], n: int, seed: int) -> Sampled:
        """`n` completions per prompt (prompt-major, like the engine), sampled with `seed`."""
        s = self.cfg.sampling
        enc = self.tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(seed)
        self.policy.eval()
        out_BT = self.policy.generate(
            **enc,
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0,
            max_new_tokens=s.max_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        width = enc["input_ids"].shape[1]
        responses = split_responses(out_BT, width, self.eos_id)
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        return Sampled(
            prompt_ids=[p for p in prompt_ids for _ in range(n)],
            response_ids=responses,
            texts=self.tok.batch_decode(responses, skip_special_tokens=True),
        )

    def vstar_pass(self, rows: list[dict], seed: int = 0) -> tuple[list[float], dict]:
        """Stage 1 on `rows` ({prompt, answer}): V* per prompt, and {generate_s, score_s, total_s, tokens}."""
        from apo_ray.algo import vstar

        v, n, bs = self.cfg.vstar, self.cfg.vstar.num_samples, self.cfg.vstar.batch_size
        gen_s = score_s = 0.0
        tokens = 0
        t_all = time.perf_counter()
        rewards: list[list[float]] = []
        for start in range(0, len(rows), bs):
            chunk = rows[start : start + bs]
            t0 = time.perf_counter()
            out = self.sample([r["prompt"] for r in chunk], n, seed + start)
            t1 = time.perf_counter()
            tokens += sum(len(r) for r in out.response_ids)
            for i, row in enumerate(chunk):
                rewards.append([self.scorer(out.texts[i * n + j], row["answer"]) for j in range(n)])
            gen_s, score_s = gen_s + t1 - t0, score_s + time.perf_counter() - t1
        vstar_P = vstar(rewards, v.beta1).tolist()
        total = time.perf_counter() - t_all
        return vstar_P, {"generate_s": gen_s, "score_s": score_s, "total_s": total, "tokens": tokens}

    def batch(self, out: Sampled, rows: list[dict]) -> tuple[Any, list[float]]:
        """The learner batch of `out` (one sample per row of `rows`: {answer, vstar}), trimmed, and its rewards."""
        from apo_ray.train.learner import RolloutBatch

        rewards = [self.scorer(text, r["answer"]) for text, r in zip(out.texts, rows)]
        batch = RolloutBatch.from_sequences(
            out.prompt_ids, out.response_ids, None, rewards, [r["vstar"] for r in rows], None, self.pad_id
        ).trimmed()
        return batch, rewards

    def update(self, batch: Any) -> tuple[torch.Tensor, dict, float]:
        """One AdamW step of A*-PO on `batch` (a trimmed `RolloutBatch`): (loss, its stats, grad norm)."""
        from apo_ray.algo import astar_po_loss
        from apo_ray.train.learner import aligned_logprobs

        t, temp = self.cfg.train, self.cfg.sampling.temperature
        self.policy.train()
        ids, mask = batch.input_ids_BT, batch.attention_mask_BT
        logp_BT = aligned_logprobs(self.policy(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, temp)
        with torch.no_grad():
            ref_logits = self.ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_logp_BT = aligned_logprobs(ref_logits, ids, temp)
        loss, stats = astar_po_loss(
            logp_BT, ref_logp_BT, batch.response_mask_BT, batch.reward_B, batch.vstar_B, t.beta2
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.grad_clip)
        self.opt.step()
        return loss, stats, float(grad_norm)

    def step(self, rows: list[dict], seed: int) -> dict:
        """One A*-PO step on `rows` ({prompt, answer, vstar}): seconds per phase, loss, reward."""
        t0 = time.perf_counter()
        out = self.sample([r["prompt"] for r in rows], 1, seed)
        t1 = time.perf_counter()
        batch, rewards = self.batch(out, rows)
        t2 = time.perf_counter()
        loss, stats, grad_norm = self.update(batch)
        t3 = time.perf_counter()
        return {
            "generate_s": t1 - t0,
            "score_s": t2 - t1,
            "update_s": t3 - t2,
            "step_s": t3 - t0,
            "loss": float(loss.detach()),
            "reward_mean": sum(rewards) / len(rewards),
            "kl": stats["log_ratio_mean"],
            "grad_norm": grad_norm,
            "gen_tokens": sum(len(r) for r in out.response_ids),
            "response_len": sum(len(r) for r in out.response_ids) / len(out.response_ids),
        }


def floor_steps(floor: Floor, prompts: list[dict], vstar_P: list[float], cfg: Config, steps: int) -> list[dict]:
    """`steps` A*-PO steps of train.rollout_batch_size prompts, chosen as Stage 2 chooses them."""
    from apo_ray.train.data import batch_indices

    t = cfg.train
    rows = []
    for step in range(1, steps + 1):
        idx = batch_indices(len(prompts), t.rollout_batch_size, step - 1, t.seed)
        batch = [{**prompts[i], "vstar": vstar_P[i]} for i in idx]
        rows.append(floor.step(batch, seed=cfg.sampling.seed * 7919 + step))
    return rows


__all__ = ["Floor", "Sampled", "check_floor_config", "floor_steps", "split_responses"]
