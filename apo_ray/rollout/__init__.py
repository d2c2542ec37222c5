"""Rollout: the vLLM sampling engine (`engine.RolloutEngine`) and learner -> engine weight sync (`weight_sync`).

Imports are deferred: importing this package pulls in neither vLLM nor torch.
"""

__all__ = ["Completion", "PromptResult", "RolloutEngine", "make_weight_sync", "write_weights_shm"]


def __getattr__(name: str):
    if name in ("Completion", "PromptResult", "RolloutEngine"):
        from apo_ray.rollout import engine

        return getattr(engine, name)
    if name in ("make_weight_sync", "write_weights_shm"):
        from apo_ray.rollout import weight_sync

        return getattr(weight_sync, name)
    raise AttributeError(name)
