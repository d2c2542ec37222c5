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

RUN_NAME = "ray"  # Ray Train run name: checkpoints live in train.output_dir/ray/step_NNNNNN
COMPLETE = ".apo_complete"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | Path) -> int:
    """The step of a step_NNNNNN directory; -1 for any other name."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a Stage 2 run, oldest first."""
    found = [p for p in (Path(output_dir) / RUN_NAME).glob("step_*") if step_of(p) >= 0 and is_complete(p)]
    return sorted(found, key=step_of)


# ---------------------------------------------------------------- inside the Ray Train workers


def save(learner: Any, out: Path, step: int, time_s: float, metrics: dict) -> None:
    """Checkpoint step `step` through Ray Train (a collective: every rank calls it), then mark it complete."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    name = step_dir_name(step)
    with tempfile.TemporaryDirectory(prefix="apo-ckpt-") as d:
        learner.save_checkpoint(d, {"step": step, "time_s": time_s, "rng": rng_state()})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    torch.distributed.barrier()  # every rank's upload is done
    stored = out / RUN_NAME / name
    if torch.distributed.get_rank() == 0 and stored.is_dir():
        (stored / COMPLETE).touch()


def resume_from(out: Path):
    """The checkpoint to resume from (a ray.train.Checkpoint), or None on a fresh run."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = ray.train.get_checkpoint()
    best = step_of(ckpt.path) if ckpt is not None else -1
    stored = find_checkpoints(out)
    if stored and step_of(stored[-1]) > best:
        ckpt = Checkpoint.from_directory(str(stored[-1]))
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
    found = [c for c in find_checkpoints(p) if (c / "hf" / "config.json").exists()]
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"{str(path)!r} is neither a Stage 2 checkpoint (no hf/config.json) nor a train.output_dir with "
        "complete checkpoints"
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Copy the HF model of a checkpoint (or of a run's newest checkpoint) to `out`; returns `out`."""
    src = resolve_checkpoint(checkpoint) / "hf"
    dst = Path(out).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"export target {str(dst)!r} exists and is not empty")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
