"""Which model a config names: "tiny" -> the cached tiny model, checkpoints -> their HF copy.

    resolve_model("tiny")                      # the project's tiny model directory (built once)
    resolve_eval_model("runs/demo/train")      # train.output_dir -> its final/ HF directory
    check_model(path, cfg)                     # fail before Ray starts (positions, heads, readable)

Hub ids ("Qwen/Qwen2.5-1.5B") pass through unchanged: vLLM and transformers fetch them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from apo_ray.config import TINY_MODEL, Config, is_local_path
from apo_ray.errors import ConfigError


def resolve_model(path: str) -> str:
    """'tiny' -> the cached tiny model (built on first use); otherwise unchanged."""
    if path == TINY_MODEL:
        from apo_ray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return path


def check_model(path: str, cfg: Config, key: str = "model.path") -> None:
    """Fail before Ray starts when a local model cannot serve `cfg`.

    The directory must hold a config.json that transformers reads, with enough positions for
    sampling.max_prompt_tokens + sampling.max_tokens and attention heads that
    engine.tensor_parallel_size divides. Hub ids are not checked here (no download at the driver).

    Raises:
        ConfigError: naming the config key to change and the model directory.
    """
    if not is_local_path(path):
        return
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {path!r} is not a model directory (no config.json)")
    conf = _plain_config(p / "config.json")
    if conf is None:
        try:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(str(p))
        except Exception as e:  # noqa: BLE001 - whatever transformers objects to, the user must fix the directory
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"config key '{key}': transformers cannot read the model in {path!r}: {first}") from None
    s, tp = cfg.sampling, cfg.engine.tensor_parallel_size
    need = s.max_prompt_tokens + s.max_tokens
    positions = getattr(conf, "max_position_embeddings", None)
    if positions and need > positions:
        raise ConfigError(
            f"config key 'sampling.max_tokens': sampling.max_prompt_tokens + sampling.max_tokens = "
            f"{s.max_prompt_tokens} + {s.max_tokens} = {need} tokens, more than the {positions} positions of "
            f"the model in {path!r} (max_position_embeddings); lower them"
        )
    heads = getattr(conf, "num_attention_heads", None)
    if heads and heads % tp:
        raise ConfigError(
            f"config key 'engine.tensor_parallel_size': {tp} does not divide the {heads} attention heads "
            f"of the model in {path!r}"
        )


def _plain_config(path: Path) -> SimpleNamespace | None:
    """The fields `check_model` reads, straight from config.json when it names its model type and
    holds them at the top level (Qwen, Llama, the tiny model); None for anything else, which goes
    through transformers' AutoConfig. AutoConfig imports transformers and torch: ~2.5 s of a
    driver's start that needs neither."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        return None
    fields = {k: raw.get(k) for k in ("max_position_embeddings", "num_attention_heads")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
        return None
    return SimpleNamespace(**fields)


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
