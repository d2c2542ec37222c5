"""Stage 2 losses: A*-PO least-squares regression, and the GRPO baseline.

A*-PO (arXiv 2505.20686), one on-policy completion y per prompt x:

    loss = 1/B * sum_b ( beta2 * sum_t m_bt (log pi(y_t) - log pi_ref(y_t)) - (r_b - V*_b) )^2

a sequence-level sum of token log-ratios: no length normalisation, no importance ratio, no
clipping, as the paper's official code. Departures / additions:
- ``normalizer`` replaces the 1/B so micro-batched and data-parallel losses add up to the
  global mean; the caller computes it over all ranks and micro-batches and passes it in.
- optional entropy bonus ``- entropy_coef * token-mean(entropy)``: the official code uses
  0.001, the paper does not mention it; our default is 0.

GRPO baseline (DeepSeekMath): group-normalised advantages, PPO clipped surrogate per token,
k3 KL estimator to the reference, token-level mean over all masked tokens of the step
(DAPO-style "token-mean", not the per-sequence mean of the original GRPO paper), and the same
optional entropy bonus as A*-PO (train.entropy_coef applies to both algorithms).

Masked positions may hold anything (padding, -inf): they are replaced by 0 before any
arithmetic, so neither the loss nor its gradient can turn nan. Reference log-probs, old
log-probs, rewards, V* and advantages are constants: they are detached here.
Losses are computed in at least float32 (bf16 inputs are upcast).
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _masked_diff(a_BT: torch.Tensor, b_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """a - b where mask, exactly 0 elsewhere (no nan from garbage in padding, in values or grads)."""
    mask_BT = mask_BT.bool()
    dtype = _compute_dtype(a_BT)
    zero = torch.zeros((), dtype=dtype, device=a_BT.device)
    a_BT = torch.where(mask_BT, a_BT.to(dtype), zero)
    b_BT = torch.where(mask_BT, b_BT.to(dtype), zero)
    return a_BT - b_BT


def sequence_log_ratio(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log pi - log pi_ref, i.e. log pi(y|x) / pi_ref(y|x).

    Args:
        logp_BT: log-probs of the sampled tokens under the policy (gradients flow).
        ref_logp_BT: the same under the reference policy (detached).
        mask_BT: 1/True on response tokens, 0/False on prompt and padding.

    Returns:
        log_ratio_B, in float32 or wider.
    """
    return _masked_diff(logp_BT, ref_logp_BT.detach(), mask_BT).sum(dim=-1)


def astar_po_loss(
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    reward_B: torch.Tensor,
    vstar_B: torch.Tensor,
    beta2: float,
    *,
    normalizer: float | None = None,
    entropy_BT: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A*-PO regression loss: sum_b (beta2 * log_ratio_b - (r_b - V*_b))^2 / normalizer.

    Args:
        logp_BT: policy log-probs of the sampled response tokens (gradients flow).
        ref_logp_BT: reference log-probs of the same tokens.
        mask_BT: response-token mask.
        reward_B: reward of each sequence.
        vstar_B: V* of each sequence's prompt (from Stage 1).
        beta2: KL coefficient of Stage 2 (paper: 1e-3).
        normalizer: divisor of the summed squared residuals; default B (the batch mean).
            M_global = sequences in the optimizer step, W data-parallel ranks that average
            gradients, G accumulation steps: pass M_global / (W * G) when the G micro-batch
            losses are averaged (DeepSpeed scales each by 1/G), M_global / W when summed.
        entropy_BT: per-token policy entropy (gradients flow), for the optional bonus.
        entropy_coef: weight of the bonus; ``loss -= entropy_coef * token-mean(entropy)``.
        num_tokens: divisor of the summed masked entropy; default this batch's mask.sum().
            When micro-batching with a bonus, pass the step's token count scaled as the
            normalizer (/ (W * G) or / W), otherwise the bonus is counted once per micro-batch.

    Returns:
        (loss, stats): a scalar tensor and detached floats "log_ratio_mean",
        "residual_mean", "residual_sq_mean", "adv_mean" (and "entropy" when given), all
        plain means over this batch, whatever the normalizer.
    """
    log_ratio_B = sequence_log_ratio(logp_BT, ref_logp_BT, mask_BT)
    adv_B = (reward_B.detach() - vstar_B.detach()).to(log_ratio_B.dtype)
    residual_B = beta2 * log_ratio_B - adv_B
    if normalizer is None:
        normalizer = residual_B.shape[0]
    loss = residual_B.square().sum() / normalizer

    stats = {
        "log_ratio_mean": log_ratio_B.detach().mean().item(),
        "residual_mean": residual_B.detach().mean().item(),
        "residual_sq_mean": residual_B.detach().square().mean().item(),
        "adv_mean": adv_B.mean().item(),
    }
    if entropy_BT is not None:
        mask_BT = mask_BT.bool()
        ent_sum = torch.where(mask_BT, entropy_BT.to(_compute_dtype(entropy_BT)), 0.0).sum()
        local_tokens = mask_BT.sum().clamp(min=1)
        denom = local_tokens if num_tokens is None else num_tokens
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent_sum / denom
        stats["entropy"] = (ent_sum.detach() / local_tokens).item()
    return loss, stats


def group_advantages(reward_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - mean) / (std + eps) within each group of G samples of a prompt.

    The std is the population one (``unbiased=False``, divide by G), so a group [1, 0, 0, 1]
    gives [1, -1, -1, 1] (TRL uses the unbiased std; it only rescales by sqrt(G/(G-1))). A
    group whose rewards are all equal gets advantages 0.

    Args:
        reward_PG: rewards, one row per prompt, one column per sample of the group.
        eps: added to the std.

    Returns:
        adv_PG, float32 or wider.
    """
    if reward_PG.dim() != 2:
        raise ValueError(f"reward_PG must be 2-D [prompts, group], got shape {tuple(reward_PG.shape)}")
    r_PG = reward_PG.detach().to(_compute_dtype(reward_PG) if reward_PG.is_floating_point() else torch.float32)
    mean_P = r_PG.mean(dim=-1, keepdim=True)
    std_P = r_PG.std(dim=-1, unbiased=False, keepdim=True)
    return (r_PG - mean_P) / (std_P + eps)


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    adv_B: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    *,
    num_tokens: float | None = None,
    entropy_BT: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with a k3 KL penalty, token-level mean (the GRPO baseline).

    Per token, with ratio = exp(logp - old_logp) and A the sequence's advantage:
        -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3 - entropy_coef * H,
        k3 = exp(ref - logp) - (ref - logp) - 1   (>= 0, 0 when logp == ref),
    H the policy's entropy at that token (when given).

    Args:
        logp_BT: current policy log-probs (gradients flow).
        old_logp_BT: log-probs of the policy that sampled the batch.
        ref_logp_BT: reference log-probs.
        mask_BT: response-token mask.
        adv_B: one advantage per sequence, broadcast over its tokens.
        clip_eps: PPO clip range eps.
        kl_coef: weight of the k3 KL term.
        num_tokens: divisor of the summed per-token losses; default this batch's mask.sum().
            The plumbing passes the optimizer step's token count T_global, as
            T_global / (W * G) when micro-batch losses are averaged over G (DeepSpeed) and
            ranks' grads over W, T_global / W when micro-batch losses are summed. The
            entropy bonus shares it, so it is the token-mean entropy of the step, as in A*-PO.
        entropy_BT: per-token policy entropy (gradients flow), for the optional bonus.
        entropy_coef: weight of the bonus; ``loss -= entropy_coef * token-mean(entropy)``.

    Returns:
        (loss, stats): "clip_frac" (share of tokens where the clipped term is the smaller,
        so its gradient is 0), "kl_k3_mean", "ratio_mean" (and "entropy" when given), all
        means over this batch's tokens.
    """
    mask_BT = mask_BT.bool()
    log_ratio_BT = _masked_diff(logp_BT, old_logp_BT.detach(), mask_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = adv_B.detach().to(ratio_BT.dtype).unsqueeze(-1)
    surr1_BT = ratio_BT * adv_B1
    surr2_BT = torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_B1
    pg_BT = -torch.minimum(surr1_BT, surr2_BT)

    ref_minus_logp_BT = _masked_diff(ref_logp_BT.detach(), logp_BT, mask_BT)
    k3_BT = torch.exp(ref_minus_logp_BT) - ref_minus_logp_BT - 1.0

    per_token_BT = pg_BT + kl_coef * k3_BT
    if entropy_BT is not None and entropy_coef != 0.0:
        per_token_BT = per_token_BT - entropy_coef * entropy_BT.to(per_token_BT.dtype)
    per_token_BT = torch.where(mask_BT, per_token_BT, 0.0)
    local_tokens = mask_BT.sum().clamp(min=1)
    denom = local_tokens if num_tokens is None else num_tokens
    loss = per_token_BT.sum() / denom

    def token_mean(x_BT: torch.Tensor) -> float:
        return (torch.where(mask_BT, x_BT.detach().to(ratio_BT.dtype), 0.0).sum() / local_tokens).item()

    stats = {
        "clip_frac": token_mean(surr2_BT < surr1_BT),
        "kl_k3_mean": token_mean(k3_BT),
        "ratio_mean": token_mean(ratio_BT),
    }
    if entropy_BT is not None:
        stats["entropy"] = token_mean(entropy_BT)
    return loss, stats
