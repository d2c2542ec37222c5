"""Stage 2 checkpoints: save, find the one to resume from, RNG state, and export to an HF directory.

Layout: train.output_dir/ray/step_NNNNNN/ holds the DeepSpeed state of every rank (weights,
optimizer, scheduler; the step, training seconds and RNG state in its client state) and, under
``hf/``, a full HF copy of the policy written by rank 0.

One rule for what a complete checkpoint is: its directory holds the ``.apo_complete`` marker,
which rank 0 writes after every rank's upload is done (`save`). Resume takes the newer of Ray
Train's latest registered checkpoint and the newest complete one in storage (Ray Train
registers a checkpoint only when its controller next polls the workers, every 2 s, so a worker
that dies sooner would otherwise restart from an older one). `apo-ray export CKPT OUT` copies
the ``hf/`` of a checkpoint, or of a train.output_dir's newest complete checkpoint.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from apo_ray.errors import ApoRayError
from apo_ray.storage import fs_exists, fs_write_bytes
from apo_ray.train.output import RunDir

RUN_NAME = "ray"  # Ray Train run name: checkpoints live in train.output_dir/ray/step_NNNNNN
COMPLETE = ".apo_complete"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | Path) -> int:
    """The step of a step_NNNNNN directory; -1 for any other name."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def find_checkpoints(out: RunDir) -> list[str]:
    """Complete checkpoint directories of a Stage 2 run (paths in `out.fs`), oldest first."""
    import pyarrow.fs as pafs

    listing = out.fs.get_file_info(pafs.FileSelector(out.join(RUN_NAME), allow_not_found=True))
    steps = [i.path for i in listing if i.type == pafs.FileType.Directory and step_of(i.path) >= 0]
    return sorted((p for p in steps if fs_exists(out.fs, f"{p}/{COMPLETE}")), key=step_of)


# ---------------------------------------------------------------- before a run: may it resume here?

# Keys whose change changes what a resumed run computes (or whether its checkpoint loads).
# Steps, checkpoint cadence, loggers, eval and resources may change between runs.
MATH_KEYS = (
    "model.path",
    "model.dtype",
    "data.task",
    "data.train_source",
    "data.train_split",
    "data.prompt_key",
    "data.answer_key",
    "data.max_train_prompts",
    "data.on_bad_row",
    "data.arith.seed",
    "data.arith.digits",
    "data.arith.ops",
    "data.arith.num_train",
    "reward.fn",
    "sampling",
    "vstar.reward_fn",
    "vstar.num_samples",
    "vstar.beta1",
    "vstar.filter_unsolvable",
    "train.algo",
    "train.vstar_dir",
    "train.rollout_batch_size",
    "train.mini_batch_size",
    "train.beta2",
    "train.lr",
    "train.weight_decay",
    "train.grad_clip",
    "train.warmup_steps",
    "train.entropy_coef",
    "train.group_size",
    "train.clip_eps",
    "train.kl_coef",
    "train.num_learners",
    "train.zero_stage",
    "train.seed",
)


_ABSENT = "<absent>"


def _lookup(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _ABSENT
        d = d[part]
    return d


def _saved_value(old: dict, key: str, defaults: dict) -> Any:
    """`key` in a saved config; a key added to the schema after that run has its default (the value it used)."""
    value = _lookup(old, key)
    return _lookup(defaults, key) if value == _ABSENT else value


def check_resume(cfg_dict: dict, out: RunDir, mode: str) -> int:
    """Whether a run with config `cfg_dict` may start in `out`; returns the step it resumes from (0: fresh).

    Args:
        cfg_dict: the run's resolved config (`config.to_dict`).
        out: train.output_dir.
        mode: train.resume: "auto" | "must" | "never".

    Raises:
        ConfigError: `out` holds checkpoints of a run whose saved config differs in a `MATH_KEYS`
            key (listing old -> new), or the mode forbids what `out` holds.
    """
    from omegaconf import OmegaConf

    from apo_ray.errors import ConfigError

    found = find_checkpoints(out)
    step = step_of(found[-1]) if found else 0
    if mode == "never" and found:
        raise ConfigError(
            f"config key 'train.resume': never, but train.output_dir {str(out)!r} holds checkpoints (last: step "
            f"{step}); use another train.output_dir or delete that one"
        )
    if mode == "must" and not found:
        raise ConfigError(f"config key 'train.resume': must, but train.output_dir {str(out)!r} holds no checkpoint")
    if not found or not out.exists("config.yaml"):
        return step
    try:
        old = OmegaConf.to_container(OmegaConf.create(out.read_text("config.yaml")))
    except Exception as e:  # noqa: BLE001 - an unreadable saved config cannot vouch for the checkpoints
        raise ConfigError(
            f"train.output_dir {str(out)!r}: its config.yaml cannot be read ({e}); use another directory"
        ) from None
    from apo_ray.config import Config

    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    changed = [
        f"{key} {_saved_value(old, key, defaults)!r} -> {_lookup(cfg_dict, key)!r}"
        for key in MATH_KEYS
        if _saved_value(old, key, defaults) != _lookup(cfg_dict, key)
    ]
    if changed:
        raise ConfigError(
            f"train.output_dir {str(out)!r} holds checkpoints (last: step {step}) of a run with other settings "
            f"({'; '.join(changed)}); resuming would mix them. Use another train.output_dir, or rerun with the "
            "saved settings (config.yaml there)"
        )
    return step


# ---------------------------------------------------------------- inside the Ray Train workers


def save(learner: Any, out: RunDir, step: int, time_s: float, metrics: dict) -> None:
    """Checkpoint step `step` through Ray Train (a collective: every rank calls it), then mark it complete.

    Rank 0 also publishes metrics.jsonl and tensorboard/ with it (a bucket run directory).
    """
    import ray.train
    import torch
    from ray.train import Checkpoint

    name = step_dir_name(step)
    with tempfile.TemporaryDirectory(prefix="apo-ckpt-") as d:
        learner.save_checkpoint(d, {"step": step, "time_s": time_s, "rng": rng_state()})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    torch.distributed.barrier()  # every rank's upload is done
    stored = out.join(RUN_NAME, name)
    if torch.distributed.get_rank() == 0 and fs_exists(out.fs, stored):
        out.publish("metrics.jsonl", "tensorboard")
        fs_write_bytes(out.fs, f"{stored}/{COMPLETE}", b"")


def resume_from(out: RunDir):
    """The checkpoint to resume from (a ray.train.Checkpoint), or None on a fresh run."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = ray.train.get_checkpoint()
    best = step_of(ckpt.path) if ckpt is not None else -1
    stored = find_checkpoints(out)
    if stored and step_of(stored[-1]) > best:
        ckpt = Checkpoint(stored[-1], filesystem=out.fs)
    return ckpt


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict | None) -> None:
    import numpy as np
    import torch

    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------- export


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if (p / "hf" / "config.json").exists():
        return p
    found = [Path(c) for c in find_checkpoints(RunDir(str(p))) if (Path(c) / "hf" / "config.json").exists()]
    if found:
        return found[-1]
    raise ApoRayError(
        f"export: {str(path)!r} is neither a Stage 2 checkpoint (no hf/config.json) nor a train.output_dir with "
        "complete checkpoints"
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Copy the HF model of a checkpoint (or of a run's newest checkpoint) to `out`; returns `out`."""
    src = resolve_checkpoint(checkpoint) / "hf"
    dst = Path(out).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise ApoRayError(f"export: target {str(dst)!r} exists and is not empty; give a new directory")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
