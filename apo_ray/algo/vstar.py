"""Stage 1 of A*-PO: the optimal value V*(x) from N reference-policy samples.

    V*(x) = beta1 * ( logsumexp_i(r(x, y_i) / beta1) - log N )

the soft-max (log-mean-exp) of the N rewards at temperature beta1 (paper eq. for V*_hat,
arXiv 2505.20686). It runs between the plain mean (beta1 = inf) and the max (beta1 -> 0).
With binary rewards, k of N correct gives V* = beta1 * ln(1 - k/N + (k/N) e^(1/beta1)).

Departures from the paper: none in the maths. It is computed in float64 via logsumexp, so
beta1 down to 1e-3 (r / beta1 = 1000) neither overflows nor loses the correction term.
The optional "drop prompts whose N rewards are all 0" filter is the pipeline's business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _check_beta1(beta1: float) -> float:
    beta1 = float(beta1)
    if math.isnan(beta1) or beta1 <= 0:
        raise ValueError(f"beta1 must be > 0 (math.inf for the plain mean), got {beta1}")
    return beta1


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ValueError(f"rewards must be 2-D [prompts, samples], got shape {tuple(shape)}")
    if shape[1] == 0:
        raise ValueError("rewards must have at least one sample per prompt (N = 0)")


def vstar(rewards_PN: torch.Tensor | np.ndarray | Sequence[Sequence[float]], beta1: float) -> torch.Tensor | np.ndarray:
    """V* per prompt from the rewards of N reference samples each.

    Args:
        rewards_PN: rewards, one row per prompt, one column per sample. A torch tensor, a
            numpy array or a list of lists (rows of equal length).
        beta1: KL coefficient of Stage 1 (> 0); ``math.inf`` gives the plain mean, small
            values approach the max (stable down to at least 1e-3).

    Returns:
        vstar_P: float64, a torch tensor (on the input's device) for a tensor input, a numpy
        array otherwise.

    Raises:
        ValueError: beta1 <= 0 or nan, input not 2-D, or N = 0.
    """
    beta1 = _check_beta1(beta1)
    if isinstance(rewards_PN, torch.Tensor):
        _check_shape(tuple(rewards_PN.shape))
        r_PN = rewards_PN.detach().to(torch.float64)
        if math.isinf(beta1):
            return r_PN.mean(dim=-1)
        n = r_PN.shape[-1]
        return beta1 * (torch.logsumexp(r_PN / beta1, dim=-1) - math.log(n))

    r_PN = np.asarray(rewards_PN, dtype=np.float64)
    _check_shape(r_PN.shape)
    if math.isinf(beta1):
        return r_PN.mean(axis=-1)
    n = r_PN.shape[-1]
    z_PN = r_PN / beta1
    if z_PN.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    # logsumexp by hand: shift by the row max so exp never overflows.
    m_P = z_PN.max(axis=-1)
    lse_P = m_P + np.log(np.exp(z_PN - m_P[:, None]).sum(axis=-1))
    return beta1 * (lse_P - math.log(n))
