"""Per-token log-probabilities and entropies from a causal LM's logits.

Both work in float32 even for bf16 logits (bf16 log-probs are too coarse for a sum of
~1000 token log-ratios scaled by beta2). Memory: no full log_softmax is materialised;
the sampled token's logit is gathered and the log-normaliser is taken by logsumexp. For
low-precision logits the float32 upcast is done one sequence at a time, so the float32
working copy is [T, V], not [B, T, V] (autograd may still keep per-row copies for backward).

The caller aligns tokens with logits: logits at position t score the token at t + 1, so
pass ``logits[:, :-1]`` with ``tokens[:, 1:]`` (or the response slice of both).
Not in the paper: these are the standard definitions; ``temperature`` must match the one
used for sampling so that log pi is the log-prob of the sampling distribution.
"""

from __future__ import annotations

import torch

_WIDE = (torch.float32, torch.float64)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for each position.

    Args:
        logits_BTV: model logits (any float dtype).
        tokens_BT: token ids to score, aligned with the logits' positions.
        temperature: sampling temperature (> 0).

    Returns:
        logp_BT in float32 (float64 for float64 logits).
    """
    _check_temperature(temperature)
    index_BT1 = tokens_BT.long().unsqueeze(-1)
    if logits_BTV.dtype in _WIDE:
        scaled_BTV = logits_BTV / temperature if temperature != 1.0 else logits_BTV
        picked_BT = scaled_BTV.gather(-1, index_BT1).squeeze(-1)
        return picked_BT - torch.logsumexp(scaled_BTV, dim=-1)
    rows = []
    for logits_TV, index_T1 in zip(logits_BTV, index_BT1):
        scaled_TV = logits_TV.float() / temperature
        rows.append(scaled_TV.gather(-1, index_T1).squeeze(-1) - torch.logsumexp(scaled_TV, dim=-1))
    if not rows:
        return logits_BTV.new_zeros(logits_BTV.shape[:2], dtype=torch.float32)
    return torch.stack(rows)


def _entropy(logits_TV: torch.Tensor) -> torch.Tensor:
    # H = logsumexp(z) - sum_v softmax(z)_v z_v
    return torch.logsumexp(logits_TV, dim=-1) - (torch.softmax(logits_TV, dim=-1) * logits_TV).sum(dim=-1)


def token_entropy(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position (gradients flow).

    Args:
        logits_BTV: model logits (any float dtype).
        temperature: sampling temperature (> 0); 1 gives the entropy of the raw logits.

    Returns:
        entropy_BT in float32 (float64 for float64 logits), in nats.
    """
    _check_temperature(temperature)
    if logits_BTV.dtype in _WIDE:
        return _entropy(logits_BTV / temperature if temperature != 1.0 else logits_BTV)
    rows = [_entropy(logits_TV.float() / temperature) for logits_TV in logits_BTV]
    if not rows:
        return logits_BTV.new_zeros(logits_BTV.shape[:2], dtype=torch.float32)
    return torch.stack(rows)
