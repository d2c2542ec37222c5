"""Stage 2: A*-PO / GRPO with Ray Train + DeepSpeed learners + colocated vLLM (see apo_ray.train.loop)."""


def run(cfg):
    """Run Stage 2 (imports Ray Train, torch and DeepSpeed only when called)."""
    from apo_ray.train.loop import run as _run

    return _run(cfg)
