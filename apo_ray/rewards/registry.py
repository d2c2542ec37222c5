"""Find a reward function by name: a built-in or "package.module:function".

Built-ins: "gsm8k" (ours), "gsm8k_strict" and "gsm8k_flexible" (the official A*-PO code's online and
offline GSM8K rewards, `apo_ray.rewards.gsm8k`), "math", "arith".

Every job resolves its reward (`reward.fn`; Stage 1: `vstar.reward_fn`, unset meaning reward.fn)
through `reward_fn_name` first, so the manifests record the spec that scored, then builds the function with
`get_reward_fn` inside the worker that scores (the string travels, not the function).
A custom function has the same contract as the built-ins: `fn(completion, answer) -> float`,
called on untrusted completions; it is returned as is, unwrapped.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable

from apo_ray.errors import ConfigError
from apo_ray.rewards.arith import arith_reward
from apo_ray.rewards.gsm8k import gsm8k_flexible_reward, gsm8k_reward, gsm8k_strict_reward
from apo_ray.rewards.math_reward import math_reward

RewardFn = Callable[[str, str], float]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    "arith": arith_reward,
    "gsm8k_strict": gsm8k_strict_reward,
    "gsm8k_flexible": gsm8k_flexible_reward,
}
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_CUSTOM_SPEC_RE = re.compile(rf"({_DOTTED}):({_DOTTED})")


def _unknown_builtin(name: str, what: str, advice: str = "give your own as 'package.module:function'") -> ValueError:
    builtins = ", ".join(BUILTIN_REWARDS)
    close = difflib.get_close_matches(name.lower(), list(BUILTIN_REWARDS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} {name!r}: built-in rewards are {builtins}, or {advice}{hint}")


def _check_spec(name: object) -> str:
    """The spec, stripped; ValueError unless it is a built-in name or well-formed 'module:function'."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward fn must be a non-empty string, got {name!r}")
    name = name.strip()
    if ":" in name:
        if _CUSTOM_SPEC_RE.fullmatch(name) is None:
            raise ValueError(f"reward fn {name!r}: expected 'package.module:function'")
    elif name not in BUILTIN_REWARDS:
        raise _unknown_builtin(name, "reward fn")
    return name


def reward_fn_name(task: str, fn: str | None) -> str:
    """The reward spec a job uses and records: `fn` if set, else the built-in reward of `task`.

    Only the spelling is checked here (a custom module is imported by `get_reward_fn`).

    Args:
        task: data.task ("gsm8k", "math", "arith").
        fn: reward.fn from the config: None, a built-in name or "package.module:function".
    """
    if fn is None:
        if task not in BUILTIN_REWARDS:
            raise _unknown_builtin(task, "task", "set reward.fn to 'package.module:function'")
        return task
    return _check_spec(fn)


def _load_custom(spec: str) -> RewardFn:
    module_name, _, attr_path = spec.partition(":")
    top = module_name.split(".")[0]
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        raise ValueError(
            f"reward fn {spec!r}: {module_name!r} is a Python standard-library module; a reward is your own "
            "function 'package.module:function' taking (completion, answer) strings"
        )
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward fn {spec!r}: cannot import module {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward fn {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward fn {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def get_reward_fn(name: str) -> RewardFn:
    """The reward function `fn(completion, answer) -> float` named by `name`.

    Args:
        name: a built-in (`BUILTIN_REWARDS`) or "package.module:function" (imported here).

    Raises:
        ValueError: an unknown built-in (with the closest match), a module that does not
            import, a missing attribute, or one that is not callable.
    """
    spec = _check_spec(name)
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    return _load_custom(spec)


def check_reward_fn(name: str, answer: str) -> None:
    """Check the reward contract at the driver, before any actor starts.

    `name` is resolved and imported, its signature must accept (completion, answer), and it is
    called on ``(answer, answer)`` and ``("", answer)`` (a completion that states the reference
    answer, and an empty one): each call must return a finite number.

    Raises:
        ValueError: naming the function and what broke the contract.
    """
    fn = get_reward_fn(name)
    try:
        inspect.signature(fn).bind("completion", "answer")
    except TypeError as e:
        raise ValueError(f"reward fn {name!r} must accept two arguments (completion, answer): {e}") from None
    except ValueError:  # no signature to inspect (some C functions): the calls below decide
        pass
    for completion in (answer, ""):
        try:
            value = fn(completion, answer)
        except Exception as e:  # noqa: BLE001 - user code: report whatever it raised
            raise ValueError(
                f"reward fn {name!r} raised on a sample (completion={completion[:60]!r}, answer={answer[:60]!r}): "
                f"{type(e).__name__}: {e}"
            ) from None
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(
                f"reward fn {name!r} returned {value!r} ({type(value).__name__}) for (completion={completion[:60]!r}, "
                f"answer={answer[:60]!r}); it must return a finite number"
            )


def checked_reward(task: str, fn: str | None, answer: str, key: str = "reward.fn") -> str:
    """The reward spec of a job (`reward_fn_name`), its contract checked on one reference `answer`.

    Args:
        key: the config key that named `fn` ("reward.fn", or "vstar.reward_fn" for Stage 1), for errors.

    Raises:
        ConfigError: naming `key` and what is wrong.
    """
    try:
        name = reward_fn_name(task, fn)
        check_reward_fn(name, answer)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    return name
