"""Models: resolving what a config names (`resolve`) and the project's own tiny model (`tiny`)."""

from apo_ray.model.resolve import check_model, resolve_eval_model, resolve_model, same_model
from apo_ray.model.tiny import build_tiny_model, ensure_tiny_model

__all__ = [
    "build_tiny_model",
    "check_model",
    "ensure_tiny_model",
    "resolve_eval_model",
    "resolve_model",
    "same_model",
]
