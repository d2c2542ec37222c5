"""Stage 2 prompt stream: the training prompts joined with Stage 1's V* shards.

The join is by `prompt_id`. A prompt with no V* row is an error naming the prompt id
and the shard directory, unless Stage 1 dropped it on purpose (vstar.filter_unsolvable,
or longer than sampling.max_prompt_tokens): the manifest lists those ids. GRPO needs no V*
and drops the prompts longer than sampling.max_prompt_tokens itself, by the same count
(`apo_ray.data.prompt_token_counts`), so both algorithms train on the same prompts (up to
vstar.filter_unsolvable, which only A*-PO can apply).

The manifest must belong to this run (`check_manifest`), including the reward that scored
Stage 1: vstar.reward_fn, or reward.fn when that is unset.

The order of prompts is a pure function of (seed, step): epoch e is a permutation
seeded by (seed, e), and step t takes rows [t*B, (t+1)*B) of the concatenated
epochs. So the data position in a checkpoint is just the step number, and a resumed
run neither repeats nor skips data.

The pipeline's stream (`pipeline.stream`, `apo_ray.pipeline`) starts Stage 2 while Stage 1 is
still writing: until every V* exists, a step draws `stream_batch_indices` from the prompts whose
shards have landed; from then on it takes `batch_indices` over the whole set, as above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from apo_ray.config import Config, vstar_reward
from apo_ray.errors import ConfigError, DataError, VStarMismatchError
from apo_ray.storage import fs_exists, fs_read_json, get_fs

log = logging.getLogger("apo_ray.train")


@dataclass(frozen=True)
class TrainPrompt:
    prompt_id: str
    prompt: str
    answer: str
    vstar: float


class VStarReader:
    """Reads Stage 1's shards of one directory, one at a time, checking each row (`_check_vstar`) and
    that no prompt id is in two shards: `read_vstar` reads all of them, the pipeline's stream
    (`apo_ray.pipeline`) each as soon as Stage 1 has written it."""

    def __init__(self, vstar_dir: str):
        self.fs, self.root = get_fs(vstar_dir)
        self.where = vstar_dir.rstrip("/")
        self.shard_of: dict[str, str] = {}

    def read(self, name: str) -> dict[str, float]:
        """{prompt_id: V*} of shard `name`.

        Raises:
            DataError: naming the file (and prompt id), as `read_vstar`.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(f"{self.root}/{name}", filesystem=self.fs)
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"V* shard {self.where}/{name} cannot be read ({e}); rerunning Stage 1 with the same command "
                "redoes missing shards (delete a corrupt one first)"
            ) from None
        shard = f"{self.where}/{name}"
        rewards = table.column("rewards").to_pylist() if "rewards" in table.column_names else None
        values: dict[str, float] = {}
        for k, (pid, v) in enumerate(zip(table.column("prompt_id").to_pylist(), table.column("vstar").to_pylist())):
            _check_vstar(pid, v, rewards[k] if rewards is not None else None, shard)
            if pid in self.shard_of or pid in values:
                raise DataError(f"prompt {pid!r} has V* rows in both {self.shard_of.get(pid, shard)} and {shard}")
            values[pid] = float(v)
        self.shard_of.update(dict.fromkeys(values, shard))
        return values


def read_vstar(vstar_dir: str) -> tuple[dict[str, float], dict]:
    """Read and check all shards of a Stage 1 output: ({prompt_id: vstar}, manifest).

    Raises:
        ConfigError: no manifest.json (Stage 1 has not run there).
        DataError: naming the file (and prompt id): an unreadable manifest or shard, a V* that
            is not finite or lies outside the range of its prompt's rewards (V* is a log-mean-exp
            of them), non-finite rewards, or a prompt id in two shards.
    """
    reader = VStarReader(vstar_dir)
    fs, root, where = reader.fs, reader.root, reader.where
    if not fs_exists(fs, f"{root}/manifest.json"):
        raise ConfigError(
            f"config key 'train.vstar_dir': {vstar_dir!r} has no manifest.json; run Stage 1 first "
            f"(python jobs/vstar.py ... vstar.output_dir={vstar_dir})"
        )
    try:
        manifest = fs_read_json(fs, f"{root}/manifest.json")
        shards = list(manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{where}/manifest.json is not a Stage 1 manifest ({type(e).__name__}: {e}); rerun Stage 1"
        ) from None
    values: dict[str, float] = {}
    for name in shards:
        values.update(reader.read(name))
    return values, manifest


def _check_vstar(pid: str, v: float | None, rewards: list | None, shard: str) -> None:
    if v is None or not math.isfinite(v):
        raise DataError(f"V* of prompt {pid!r} in {shard} is {v}, not a finite number; rerun Stage 1")
    if rewards is None:
        return
    if not rewards or any(r is None or not math.isfinite(r) for r in rewards):
        raise DataError(f"rewards of prompt {pid!r} in {shard} are {rewards}: not all finite numbers; rerun Stage 1")
    lo, hi = min(rewards), max(rewards)
    if not lo - 1e-9 <= v <= hi + 1e-9:
        raise DataError(
            f"V* of prompt {pid!r} in {shard} is {v}, outside the range of its rewards [{lo}, {hi}] "
            "(V* is a log-mean-exp of them); rerun Stage 1"
        )


def load_train_prompts(cfg: Config, model: str) -> list[TrainPrompt]:
    """Training prompts with their V* (A*-PO), or with V* = 0 (GRPO needs none).

    Args:
        cfg: the run's config.
        model: the resolved reference model of this run (a directory with its tokenizer for GRPO).
            The V* must belong to this run (`check_manifest`); a prompt without a V* row is an
            error unless Stage 1 dropped it.
    """
    from apo_ray.data import load_prompts

    prompts = load_prompts(cfg.data, "train")
    if cfg.train.algo != "astar_po":
        return _short_enough(cfg, prompts.rows, model)
    values, manifest = read_vstar(cfg.train.vstar_dir)
    check_manifest(cfg, manifest, vstar_reward_name(cfg), model, prompts.fingerprint)
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


def _short_enough(cfg: Config, rows: list[dict], model: str) -> list[TrainPrompt]:
    """GRPO's prompts: those of at most sampling.max_prompt_tokens tokens (Stage 1's rule), V* = 0."""
    from transformers import AutoTokenizer

    from apo_ray.data import prompt_token_counts

    limit = cfg.sampling.max_prompt_tokens
    lengths = prompt_token_counts(AutoTokenizer.from_pretrained(model), [r["prompt"] for r in rows])
    out = [TrainPrompt(r["prompt_id"], r["prompt"], r["answer"], 0.0) for r, n in zip(rows, lengths) if n <= limit]
    if len(out) < len(rows):
        log.info("%d prompts longer than sampling.max_prompt_tokens=%d are not trained on", len(rows) - len(out), limit)
    if not out:
        raise ConfigError(
            f"config key 'sampling.max_prompt_tokens': all {len(rows)} training prompts are longer than {limit} tokens"
        )
    return out


def vstar_reward_name(cfg: Config) -> str:
    """The reward spec that scores Stage 1 under this config (vstar.reward_fn, else reward.fn), spelling checked.

    Raises:
        ConfigError: naming the key that gave it.
    """
    from apo_ray.rewards import reward_fn_name

    key, fn = vstar_reward(cfg)
    try:
        return reward_fn_name(cfg.data.task, fn)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def _as_float(value: object) -> object:
    return float(value) if isinstance(value, (int, float, str)) and value not in ("",) else value


def check_manifest(cfg: Config, manifest: dict, vstar_reward_fn: str, model: str | None, fingerprint: str) -> None:
    """Refuse V* computed under other settings than this run's, listing every difference.

    Compared: the reference model (resolved path), Stage 1's reward (`vstar_reward_fn`: the spec
    vstar.reward_fn, else reward.fn, resolves to; `vstar_reward_name`), vstar.num_samples / beta1 /
    filter_unsolvable, the sampling settings (temperature, top_p, max_tokens, max_prompt_tokens;
    not the seed) and the dataset fingerprint (prompt ids, texts with their template, answers).
    A field a manifest does not record is not compared.

    Raises:
        VStarMismatchError: naming train.vstar_dir and each key with both values.
    """
    sampling = manifest.get("sampling") or {}
    s, v = cfg.sampling, cfg.vstar
    pairs = [
        ("model.path", manifest.get("model"), model),
        (vstar_reward(cfg)[0], manifest.get("reward_fn"), vstar_reward_fn),
        ("vstar.num_samples", manifest.get("num_samples"), v.num_samples),
        ("vstar.beta1", _as_float(manifest.get("beta1")) if "beta1" in manifest else None, v.beta1),
        ("vstar.filter_unsolvable", manifest.get("filter_unsolvable"), v.filter_unsolvable),
        ("sampling.temperature", sampling.get("temperature"), s.temperature),
        ("sampling.top_p", sampling.get("top_p"), s.top_p),
        ("sampling.max_tokens", sampling.get("max_tokens"), s.max_tokens),
        ("sampling.max_prompt_tokens", sampling.get("max_prompt_tokens"), s.max_prompt_tokens),
        ("data.* (dataset fingerprint)", (manifest.get("dataset") or {}).get("fingerprint"), fingerprint),
    ]
    diffs = [
        f"{key} is {theirs!r} there, {ours!r} here"
        for key, theirs, ours in pairs
        if theirs is not None and ours is not None and theirs != ours
    ]
    if diffs:
        raise VStarMismatchError(
            f"V* in {cfg.train.vstar_dir!r} was computed under other settings than this run's: {'; '.join(diffs)}. "
            "Rerun Stage 1 with this config (jobs/vstar.py), or point train.vstar_dir at a matching V* "
            "(Stage 1's reward is vstar.reward_fn, or reward.fn when that is unset)"
        )
    if manifest.get("complete") is False:
        raise VStarMismatchError(f"V* in {cfg.train.vstar_dir!r} is incomplete (Stage 1 did not finish); rerun Stage 1")


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


def stream_batch_indices(num_available: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (0-based) while Stage 1 is still writing V* (the pipeline's
    stream): `batch_size` distinct prompts drawn uniformly from the first `num_available` (those
    whose V* exists, in the order their shards landed), a pure function of (seed, step, num_available).

    Unlike `batch_indices` this is not epoch-wise: a prompt may come back in the next step while
    another waits; once every V* exists, steps use `batch_indices` over the whole set.
    """
    if num_available < batch_size:
        raise ValueError(f"{num_available} prompts with V* cannot fill a step of {batch_size}")
    rng = np.random.default_rng([seed, step, num_available])
    return [int(i) for i in rng.choice(num_available, size=batch_size, replace=False)]
