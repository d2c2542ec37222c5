"""Collectives over the learners' torch.distributed group (gloo on CPU, nccl on GPU).

Every helper is a no-op on a single rank. The tensors live where the backend needs them:
`comm_device()` is the one rule (cuda for nccl, cpu for gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _single() -> bool:
    return not dist.is_initialized() or dist.get_world_size() == 1


def comm_device() -> torch.device:
    """The device collectives must use: this rank's GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(value: float) -> float:
    """`value` summed over all ranks (float64)."""
    if _single():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item())


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over all ranks (float64; one all_reduce for the whole dict)."""
    keys = sorted(values)
    if _single():
        return {k: float(values[k]) for k in keys}
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def max_over_ranks(value: float) -> float:
    """`value`'s maximum over all ranks (float64)."""
    if _single():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over all ranks (one all_reduce for the whole dict)."""
    world = 1 if _single() else dist.get_world_size()
    return {k: v / world for k, v in sum_over_ranks(values).items()}


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step)."""
    if _single():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def min_over_ranks(values: list[float]) -> list[float]:
    """Each value's minimum over all ranks (one all_reduce for the whole list)."""
    if _single():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.tolist()
