"""Stage 1: V* estimation as a Ray Data job (see apo_ray.vstar.pipeline)."""

from apo_ray.vstar.pipeline import run

__all__ = ["run"]
