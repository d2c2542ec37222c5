"""Evaluation: greedy accuracy, pass@k and KL to the reference through a pool of vLLM actors.

    python jobs/eval.py --config demo eval.model_path=runs/demo/train/final

See `apo_ray.eval.evaluate` for how, and where it departs from the paper.
"""

from apo_ray.eval.evaluate import (
    EvalWorker,
    aggregate,
    evaluate,
    format_table,
    pass_at_k,
    reference_logprobs,
    resolve_eval_model,
    run,
    same_model,
)

__all__ = [
    "EvalWorker",
    "aggregate",
    "evaluate",
    "format_table",
    "pass_at_k",
    "reference_logprobs",
    "resolve_eval_model",
    "run",
    "same_model",
]
