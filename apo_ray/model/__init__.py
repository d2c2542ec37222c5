"""The project's own tiny model: a char-level Qwen2 warm-started on arithmetic (see `tiny`)."""

from apo_ray.model.tiny import build_tiny_model, ensure_tiny_model, resolve_model_path

__all__ = ["build_tiny_model", "ensure_tiny_model", "resolve_model_path"]
