"""Training checkpoints -> Hugging Face model directories (`apo-ray export CKPT OUT`).

A Stage 2 checkpoint (train.output_dir/ray/step_NNNNNN/) holds the DeepSpeed state
(optimizer, scheduler, data position and RNG in its client state) and, under `hf/`,
a full HF copy of the policy written by rank 0, which is what export copies out. The
argument may also be a train.output_dir: then its newest checkpoint is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a Stage 2 run, oldest first."""
    return sorted(p for p in (Path(output_dir) / "ray").glob("step_*") if (p / "hf" / "config.json").exists())


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if (p / "hf" / "config.json").exists():
        return p
    found = find_checkpoints(p)
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"{str(path)!r} is neither a Stage 2 checkpoint (no hf/config.json) nor a train.output_dir with checkpoints"
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Copy the HF model of a checkpoint (or of a run's newest checkpoint) to `out`; returns `out`."""
    src = resolve_checkpoint(checkpoint) / "hf"
    dst = Path(out).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"export target {str(dst)!r} exists and is not empty")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
