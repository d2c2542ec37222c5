"""Verifiable rewards r(x, y) in {0, 1}: answer extraction and checking for GSM8K, MATH and arith.

Built-in names: "gsm8k" (ours), "gsm8k_strict" / "gsm8k_flexible" (the official A*-PO code's
online / offline GSM8K rewards), "math", "arith".

`get_reward_fn(name)` returns `fn(completion, answer) -> float` for a built-in name or a
user's "package.module:function"; `reward_fn_name(task, fn)` resolves the configured name;
`RewardScorer` is the one error policy every stage scores with (see `score`).
Completions are untrusted model output: the built-ins never evaluate them, never raise on
them, and answer in well under a second on any input up to 100,000 characters. By default the
same function scores Stage 1 and Stage 2; `vstar.reward_fn` names another for Stage 1 (the
shipped GSM8K paper configs do, as the paper's code: flexible offline, strict online).
"""

from apo_ray.rewards.arith import arith_reward
from apo_ray.rewards.gsm8k import (
    extract_gsm8k_answer,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    gsm8k_flexible_reward,
    gsm8k_reward,
    gsm8k_strict_reward,
)
from apo_ray.rewards.math_reward import extract_boxed, math_reward, normalize_math, parse_math_number
from apo_ray.rewards.registry import (
    BUILTIN_REWARDS,
    RewardFn,
    check_reward_fn,
    checked_reward,
    get_reward_fn,
    reward_fn_name,
)
from apo_ray.rewards.score import RewardScorer, score

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardScorer",
    "arith_reward",
    "check_reward_fn",
    "checked_reward",
    "extract_boxed",
    "extract_gsm8k_answer",
    "extract_gsm8k_flexible",
    "extract_gsm8k_strict",
    "get_reward_fn",
    "gsm8k_flexible_reward",
    "gsm8k_reward",
    "gsm8k_strict_reward",
    "math_reward",
    "normalize_math",
    "parse_math_number",
    "reward_fn_name",
    "score",
]
