"""Which model a config names: "tiny" -> the cached tiny model, checkpoints -> their HF copy.

    resolve_model("tiny")                      # the project's tiny model directory (built once)
    resolve_eval_model("runs/demo/train")      # train.output_dir -> its final/ HF directory
    check_model_dir(path)                      # fail before any actor starts

Hub ids ("Qwen/Qwen2.5-1.5B") pass through unchanged: vLLM and transformers fetch them.
"""

from __future__ import annotations

import os
from pathlib import Path

from apo_ray.config import TINY_MODEL, is_local_path
from apo_ray.errors import ConfigError


def resolve_model(path: str) -> str:
    """'tiny' -> the cached tiny model (built on first use); otherwise unchanged."""
    if path == TINY_MODEL:
        from apo_ray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return path


def check_model_dir(path: str, key: str = "model.path") -> None:
    """Fail early (before any actor starts) when a local model directory is unusable."""
    if not is_local_path(path):
        return
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {path!r} is not a model directory (no config.json)")


def resolve_eval_model(path: str | os.PathLike, key: str = "eval.model_path") -> str:
    """The HF model (directory or hub id) that `path` designates.

    Args:
        path: "tiny"; a hub id (returned unchanged); an HF model directory (has config.json);
            a Stage 2 checkpoint directory (its ``hf/``); or a train.output_dir (its ``final/``).
        key: the config key named in errors.

    Returns:
        An absolute HF model directory, or the hub id.

    Raises:
        ConfigError: naming `key` and `path` when it does not exist or holds no model.
    """
    path = os.fspath(path)
    if path == TINY_MODEL:
        return resolve_model(path)
    if not is_local_path(path):
        return path  # a hub id: vLLM and transformers fetch it
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config key '{key}': model path {path!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"config key '{key}': model path {path!r} is not a directory")
    for cand in (p, p / "hf", p / "final"):
        if (cand / "config.json").is_file():
            return str(cand.resolve())
    ckpts = sorted({c.parent.parent for c in [*p.glob("*/hf/config.json"), *p.glob("*/*/hf/config.json")]})
    hint = f" It holds training checkpoints; evaluate one of them, e.g. {str(ckpts[-1])!r}." if ckpts else ""
    raise ConfigError(
        f"config key '{key}': {path!r} holds no model: expected an HF model directory (config.json), "
        f"a training checkpoint (hf/config.json) or a train.output_dir (final/config.json).{hint}"
    )


def same_model(a: str, b: str) -> bool:
    """Whether two resolved model locations are the same (same real path, or same hub id)."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b
