"""Stage 2 prompt stream: the training prompts joined with Stage 1's V* shards.

The join is by `prompt_id`. A prompt with no V* row is an error naming the prompt id
and the shard directory, unless Stage 1 dropped it on purpose (vstar.filter_unsolvable,
or longer than sampling.max_prompt_tokens): the manifest lists those ids.

The order of prompts is a pure function of (seed, step): epoch e is a permutation
seeded by (seed, e), and step t takes rows [t*B, (t+1)*B) of the concatenated
epochs. So the data position in a checkpoint is just the step number, and a resumed
run neither repeats nor skips data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from apo_ray.config import Config
from apo_ray.errors import ConfigError, VStarMismatchError
from apo_ray.storage import fs_exists, fs_read_json, get_fs

log = logging.getLogger("apo_ray.train")


@dataclass(frozen=True)
class TrainPrompt:
    prompt_id: str
    prompt: str
    answer: str
    vstar: float


def read_vstar(vstar_dir: str) -> tuple[dict[str, float], dict]:
    """Read all shards of a Stage 1 output: ({prompt_id: vstar}, manifest)."""
    import pyarrow.parquet as pq

    fs, root = get_fs(vstar_dir)
    if not fs_exists(fs, f"{root}/manifest.json"):
        raise ConfigError(
            f"config key 'train.vstar_dir': {vstar_dir!r} has no manifest.json; run Stage 1 first "
            f"(python jobs/vstar.py ... vstar.output_dir={vstar_dir})"
        )
    manifest = fs_read_json(fs, f"{root}/manifest.json")
    values: dict[str, float] = {}
    for name in manifest["shards"]:
        table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=["prompt_id", "vstar"])
        for pid, v in zip(table.column("prompt_id").to_pylist(), table.column("vstar").to_pylist()):
            values[pid] = float(v)
    return values, manifest


def load_train_prompts(cfg: Config, reward_fn: str, model: str | None = None) -> list[TrainPrompt]:
    """Training prompts with their V* (A*-PO), or with V* = 0 (GRPO needs none).

    `model` is the resolved reference model of this run; a Stage 1 output recorded with
    another model gets a warning (the same weights may sit at another path, so not an error).
    """
    from apo_ray.data import load_prompts

    prompts = load_prompts(cfg.data, "train")
    if cfg.train.algo != "astar_po":
        return [TrainPrompt(r["prompt_id"], r["prompt"], r["answer"], 0.0) for r in prompts.rows]
    values, manifest = read_vstar(cfg.train.vstar_dir)
    if manifest.get("reward_fn") != reward_fn:
        raise VStarMismatchError(
            f"V* in {cfg.train.vstar_dir!r} was scored with reward function {manifest.get('reward_fn')!r}, "
            f"this run uses {reward_fn!r}: both stages must use the same reward (reward.fn)"
        )
    if model is not None and manifest.get("model") not in (None, model):
        log.warning(
            "V* in %r was computed with model %r, but this run's reference policy is %r: A*-PO needs V* "
            "of the reference policy, so rerun Stage 1 unless both are the same weights",
            cfg.train.vstar_dir,
            manifest.get("model"),
            model,
        )
    dropped = set(manifest.get("filtered_prompt_ids", [])) | set(manifest.get("too_long_prompt_ids", []))
    out = []
    for r in prompts.rows:
        if r["prompt_id"] in values:
            out.append(TrainPrompt(r["prompt_id"], r["prompt"], r["answer"], values[r["prompt_id"]]))
        elif r["prompt_id"] not in dropped:
            raise VStarMismatchError(
                f"prompt {r['prompt_id']!r} has no V* row in {cfg.train.vstar_dir!r} "
                f"(Stage 1 ran on other data? its dataset fingerprint is {manifest['dataset']['fingerprint']}, "
                f"this prompt set's is {prompts.fingerprint})"
            )
    if len(dropped):
        log.info("%d prompts dropped by Stage 1 (unsolvable or too long) are not trained on", len(dropped))
    if not out:
        raise VStarMismatchError(f"no training prompts left after the join with {cfg.train.vstar_dir!r}")
    return out


def batch_indices(num_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (0-based) in a seeded, epoch-wise shuffled stream."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, num_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        take = min(batch_size - len(out), num_prompts - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        pos += take
    return out
