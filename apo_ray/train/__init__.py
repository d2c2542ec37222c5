"""Stage 2: A*-PO / GRPO with Ray Train + DeepSpeed learners + colocated vLLM.

`loop` is the driver (`run`), `recipe` the step every worker runs (generate, score, update,
sync), `learner` the DeepSpeed rank, `checkpoint` save / resume / export, `data` the prompt
stream joined with Stage 1's V*, `plan` the values derived from the config.
"""


def run(cfg):
    """Run Stage 2 (imports Ray Train, torch and DeepSpeed only when called)."""
    from apo_ray.train.loop import run as _run

    return _run(cfg)
