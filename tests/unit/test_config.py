"""The typed config: YAML then dotlist merging, errors that name the key, every validation rule,
and lossless round trips (save_config -> load_config, to_dict -> config_from_dict)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import apo_ray.config as config_module
from apo_ray.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_files,
    config_from_dict,
    config_parts,
    is_local_path,
    load_config,
    save_config,
    shipped_configs,
    to_dict,
)

# A valid non-arith base: GSM8K from the Hub (hub ids and hf: sources need not exist locally).
GSM8K = ["data.task=gsm8k", "data.train_source=hf:openai/gsm8k:main", "data.eval_source=hf:openai/gsm8k:main"]


def error_of(name: str | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(name, overrides)
    return str(e.value)


# ---------------------------------------------------------------- loading and merging


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.vstar.num_samples, cfg.vstar.beta1, cfg.train.beta2, cfg.train.lr) == (8, 0.5, 1e-3, 1e-6)


def test_yaml_is_merged_over_defaults_then_dotlist_over_yaml(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("vstar:\n  num_samples: 4\ntrain:\n  lr: 1.0e-5\n  beta2: 0.01\n")
    cfg = load_config(str(path), ["train.lr=2e-5", "sampling.top_p=0.9"])
    assert cfg.train.lr == 2e-5  # dotlist beats YAML
    assert cfg.train.beta2 == 0.01  # YAML beats defaults
    assert cfg.vstar.num_samples == 4
    assert cfg.sampling.top_p == 0.9  # dotlist beats defaults
    assert cfg.vstar.beta1 == 0.5  # untouched default
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.vstar.num_samples, int)


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path):
    # YAML 1.1 reads "1e-5" as a string; the typed schema must still give a float.
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-5\n")
    assert load_config(str(path)).train.lr == 1e-5


def test_shipped_name_and_its_path_load_the_same():
    assert load_config("demo") == load_config(str(CONFIG_DIR / "demo.yaml"))


def test_shipped_configs_lists_names_without_suffix():
    names = shipped_configs()
    assert "demo" in names and names == sorted(names)
    assert not any(n.endswith(".yaml") for n in names)


def test_unknown_config_name_suggests_the_closest():
    msg = error_of("demoo")
    assert "--config 'demoo'" in msg and "Did you mean 'demo'?" in msg
    msg = error_of("gsm8k_qwen2.5_1.5")
    assert "Did you mean 'gsm8k_qwen2.5_1.5b'?" in msg


def test_unknown_config_name_lists_shipped_configs():
    msg = error_of("no_such_config_at_all")
    assert "demo" in msg and "Did you mean" not in msg


# ---------------------------------------------------------------- unknown keys and wrong types


@pytest.mark.parametrize(
    "override, named, suggested",
    [
        ("vstar.betaa1=1", "vstar.betaa1", "vstar.beta1"),
        ("train.lrr=1e-5", "train.lrr", "train.lr"),
        ("sampling.temprature=0.5", "sampling.temprature", "sampling.temperature"),
        # An unknown section is reported at the section level, with the closest section.
        ("trian.lr=1e-5", "trian", "train"),
    ],
)
def test_unknown_key_is_named_with_closest_suggestion(override, named, suggested):
    msg = error_of("demo", [override])
    assert msg.startswith("command line: ")
    assert f"unknown config key '{named}'" in msg
    assert f"Did you mean '{suggested}'?" in msg


def test_unknown_key_in_yaml_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("vstar:\n  beta1: 0.5\n  betaa1: 2\n")
    msg = error_of(str(path))
    assert str(path) in msg
    assert "unknown config key 'vstar.betaa1'" in msg and "Did you mean 'vstar.beta1'?" in msg


@pytest.mark.parametrize(
    "override, key",
    [("train.lr=abc", "train.lr"), ("vstar.num_samples=1.5", "vstar.num_samples"), ("train.lr=null", "train.lr")],
)
def test_type_error_names_the_key(override, key):
    msg = error_of("demo", [override])
    assert msg.startswith("command line: ")
    assert f"bad value for '{key}'" in msg


def test_type_error_in_yaml_names_the_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_steps: many\n")
    msg = error_of(str(path))
    assert str(path) in msg and "'train.num_steps'" in msg


def test_override_without_equals_sign():
    assert "expected key=value" in error_of("demo", ["train.lr"])


# ---------------------------------------------------------------- validation rules


@pytest.mark.parametrize(
    "override, key",
    [
        ("vstar.num_samples=0", "vstar.num_samples"),
        ("vstar.num_samples=-2", "vstar.num_samples"),
        ("vstar.beta1=0", "vstar.beta1"),
        ("vstar.beta1=-0.5", "vstar.beta1"),
        ("vstar.beta1=-inf", "vstar.beta1"),
        ("vstar.beta1=nan", "vstar.beta1"),
        ("train.beta2=0", "train.beta2"),
        ("train.beta2=-1e-3", "train.beta2"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-6", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("sampling.temperature=-0.1", "sampling.temperature"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("sampling.top_p=-0.5", "sampling.top_p"),
        ("sampling.top_p=1.01", "sampling.top_p"),
        ("sampling.top_p=nan", "sampling.top_p"),
        ("sampling.max_tokens=0", "sampling.max_tokens"),
        ("train.weight_decay=-0.01", "train.weight_decay"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.entropy_coef=-0.001", "train.entropy_coef"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.num_learners=0", "train.num_learners"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.save_every=0", "train.save_every"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.algo=ppo", "train.algo"),
        ("train.placement=remote", "train.placement"),
        ("data.task=chess", "data.task"),
        ("data.on_bad_row=ignore", "data.on_bad_row"),
        ("model.dtype=int8", "model.dtype"),
        ("resources.device=tpu", "resources.device"),
        ("vstar.max_actors=0", "vstar.max_actors"),
        ("vstar.shard_size=0", "vstar.shard_size"),
        ("eval.k=0", "eval.k"),
        ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization"),
        ("engine.gpu_memory_utilization=1.5", "engine.gpu_memory_utilization"),
    ],
)
def test_bad_value_is_rejected_naming_the_key(override, key):
    msg = error_of("demo", [override])
    assert msg.startswith(f"config key '{key}':"), msg


@pytest.mark.parametrize(
    "override",
    [
        "sampling.temperature=0",  # greedy
        "sampling.top_p=1",
        "sampling.top_p=0.5",
        "vstar.num_samples=1",
        "train.weight_decay=0",
        "train.grad_clip=0",
        "train.num_steps=0",
        "engine.gpu_memory_utilization=1",
        "train.zero_stage=3",
    ],
)
def test_boundary_values_are_accepted(override):
    load_config("demo", [override])


def test_max_actors_below_min_actors():
    msg = error_of("demo", ["vstar.min_actors=3", "vstar.max_actors=2"])
    assert "vstar.max_actors" in msg and "vstar.min_actors" in msg


@pytest.mark.parametrize("value", ["inf", ".inf", "Infinity"])
def test_beta1_inf_from_the_command_line_means_plain_mean(value):
    cfg = load_config("demo", [f"vstar.beta1={value}"])
    assert math.isinf(cfg.vstar.beta1) and cfg.vstar.beta1 > 0


def test_beta1_inf_from_yaml(tmp_path: Path):
    path = tmp_path / "mean.yaml"
    path.write_text("vstar:\n  beta1: .inf\n")
    cfg = load_config(str(path))
    assert cfg.vstar.beta1 == math.inf


def test_rollout_batch_must_be_a_multiple_of_mini_batch():
    msg = error_of("demo", ["train.rollout_batch_size=64", "train.mini_batch_size=48"])
    assert msg.startswith("config key 'train.mini_batch_size':")
    assert "train.rollout_batch_size=64" in msg


def test_mini_batch_must_split_into_learners_times_micro_batches():
    # demo: mini 64 prompts, micro 64, 1 learner. 3 learners x 64 does not divide 64.
    msg = error_of("demo", ["train.num_learners=3"])
    assert msg.startswith("config key 'train.micro_batch_size':")
    assert "train.num_learners (3)" in msg and "train.micro_batch_size (64)" in msg
    load_config("demo", ["train.num_learners=2", "train.micro_batch_size=32"])  # 64 = 2 x 32 x 1


def test_grpo_counts_group_size_sequences_per_prompt():
    # 64 prompts x 3 completions = 192 sequences = 4 x 48: valid for GRPO, not for A*-PO (64 sequences).
    load_config("demo", ["train.algo=grpo", "train.group_size=3", "train.micro_batch_size=48"])
    assert "train.micro_batch_size" in error_of("demo", ["train.micro_batch_size=48"])


def test_nonexistent_local_model_path_names_key_and_path(tmp_path: Path):
    missing = tmp_path / "no_model_here"
    msg = error_of("demo", [f"model.path={missing}"])
    assert msg.startswith("config key 'model.path':") and str(missing) in msg
    assert "'./missing_model_dir'" in error_of("demo", ["model.path=./missing_model_dir"])


def test_existing_model_dir_hub_id_and_tiny_are_accepted(tmp_path: Path):
    assert load_config("demo", [f"model.path={tmp_path}"]).model.path == str(tmp_path)
    assert load_config("demo", ["model.path=Qwen/Qwen2.5-1.5B"]).model.path == "Qwen/Qwen2.5-1.5B"
    assert load_config("demo", ["model.path=tiny"]).model.path == "tiny"


@pytest.mark.parametrize("key", ["data.train_source", "data.eval_source"])
def test_nonexistent_prompt_file_names_key_and_path(tmp_path: Path, key):
    missing = tmp_path / "prompts.jsonl"
    msg = error_of(None, [*GSM8K, f"{key}={missing}"])
    assert msg.startswith(f"config key '{key}':") and str(missing) in msg


def test_existing_prompt_file_and_hf_sources_are_accepted(tmp_path: Path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    cfg = load_config(None, [*GSM8K, f"data.train_source={f}"])
    assert cfg.data.train_source == str(f) and cfg.data.eval_source == "hf:openai/gsm8k:main"


def test_synthetic_prompts_only_for_arith():
    msg = error_of(None, ["data.task=gsm8k"])  # sources default to "synthetic"
    assert msg.startswith("config key 'data.train_source':") and "arith" in msg


@pytest.mark.parametrize(
    "location, local",
    [
        ("hf:openai/gsm8k:main", False),
        ("s3://bucket/prompts", False),
        ("gs://bucket/model", False),
        ("Qwen/Qwen2.5-1.5B", False),  # hub id
        ("/abs/model", True),
        ("./rel/model", True),
        ("~/model", True),
        ("prompts.jsonl", True),  # a bare file name is not a hub id
    ],
)
def test_is_local_path(location, local):
    assert is_local_path(location) is local


# ---------------------------------------------------------------- round trips


def test_save_config_then_load_config_gives_an_equal_config(tmp_path: Path):
    cfg = load_config("gsm8k_qwen2.5_1.5b", ["vstar.beta1=inf", "train.wandb_project=apo", "train.lr=3e-7"])
    path = save_config(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "config.yaml"
    back = load_config(str(path))
    assert back == cfg
    assert math.isinf(back.vstar.beta1) and back.train.lr == 3e-7 and back.data.prompt_key is None


@pytest.mark.parametrize("name", shipped_configs())
def test_to_dict_then_config_from_dict_round_trips(name):
    cfg = load_config(name, ["vstar.beta1=inf"])
    d = to_dict(cfg)
    assert isinstance(d, dict) and isinstance(d["train"], dict)
    assert config_from_dict(d) == cfg


def test_config_from_dict_rejects_unknown_keys():
    d = to_dict(load_config("demo"))
    d["vstar"]["betaa1"] = 1.0
    with pytest.raises(ConfigError, match=r"vstar\.betaa1"):
        config_from_dict(d)


# ---------------------------------------------------------------- gaps found in review, now fixed


def test_missing_relative_prompt_file_with_a_slash_is_rejected():
    msg = error_of(None, [*GSM8K, "data.train_source=data/missing_prompts.jsonl"])
    assert "data.train_source" in msg


def test_section_replaced_by_a_scalar_names_the_key():
    msg = error_of("demo", ["train=1"])
    assert "'train'" in msg


def test_type_error_message_is_one_line():
    assert "\n" not in error_of("demo", ["train.lr=abc"])


def test_infinite_learning_rate_is_rejected():
    error_of("demo", ["train.lr=inf"])


# ---------------------------------------------------------------- choices (typing.Literal fields)


def test_bad_choice_message_lists_the_allowed_values_and_the_origin(tmp_path: Path):
    assert error_of("demo", ["train.algo=ppo"]) == (
        "config key 'train.algo': must be one of astar_po, grpo; got 'ppo' (command line)"
    )
    assert error_of("demo", ["train.zero_stage=4"]) == (
        "config key 'train.zero_stage': must be one of 0, 1, 2, 3; got 4 (command line)"
    )
    assert error_of("demo", ["engine.cpu_gemm=mkl"]) == (
        "config key 'engine.cpu_gemm': must be one of onednn, torch; got 'mkl' (command line)"
    )
    assert error_of("demo", ["engine.enforce_eager=false"]).startswith(
        "config key 'engine.cpu_gemm': 'torch' needs engine.enforce_eager=true"
    )
    path = tmp_path / "bad.yaml"
    path.write_text("resources:\n  device: tpu\n")
    assert error_of(str(path)) == (f"config key 'resources.device': must be one of auto, cpu, cuda; got 'tpu' ({path})")


def test_choices_are_plain_values():
    cfg = load_config("demo", ["train.algo=grpo", "model.dtype=bfloat16", "train.zero_stage=3"])
    assert type(cfg.train.algo) is str and cfg.train.algo == "grpo"
    assert type(cfg.model.dtype) is str and type(cfg.train.zero_stage) is int and cfg.train.zero_stage == 3
    assert config_from_dict(to_dict(cfg)) == cfg


def test_bad_choice_in_a_config_dict_names_the_key():
    d = to_dict(load_config("demo"))
    d["data"]["on_bad_row"] = "ignore"
    with pytest.raises(ConfigError, match=r"^config key 'data\.on_bad_row': must be one of error, skip"):
        config_from_dict(d)


# ---------------------------------------------------------------- engine.cpu_kvcache_gib and data limits


def test_cpu_kvcache_gib_takes_fractions_of_a_gib():
    assert load_config("demo", ["engine.cpu_kvcache_gib=4"]).engine.cpu_kvcache_gib == 4.0
    assert load_config().engine.cpu_kvcache_gib == 1.0
    assert load_config("demo").engine.cpu_kvcache_gib == 0.125  # 128 MiB: 4x what the demo's engines hold
    msg = error_of("demo", ["engine.cpu_kvcache_gib=lots"])
    assert msg.startswith("command line: bad value for 'engine.cpu_kvcache_gib'"), msg
    for bad in ("0", "-2", "nan"):
        msg = error_of("demo", [f"engine.cpu_kvcache_gib={bad}"])
        assert msg.startswith("config key 'engine.cpu_kvcache_gib': must be > 0"), msg


@pytest.mark.parametrize("key", ["data.max_train_prompts", "data.max_eval_prompts"])
def test_prompt_limits_must_be_positive_or_null(key):
    for bad in ("0", "-1"):
        msg = error_of("demo", [f"{key}={bad}"])
        assert msg.startswith(f"config key '{key}': must be >= 1"), msg
    assert getattr(load_config("demo", [f"{key}=1"]).data, key.split(".")[1]) == 1
    assert getattr(load_config("demo", [f"{key}=null"]).data, key.split(".")[1]) is None


def test_eval_num_actors_must_be_positive():
    assert error_of("demo", ["eval.num_actors=0"]).startswith("config key 'eval.num_actors':")


# ---------------------------------------------------------------- `defaults:` lists of shipped parts


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_parts_are_not_listed_as_runnable_configs():
    names = shipped_configs()
    assert not any(n.startswith("parts/") for n in names)
    assert {"parts/paper", "parts/task_gsm8k", "parts/task_math", "parts/qwen2.5_7b"} <= set(config_parts())


@pytest.mark.parametrize("how", ["name", "path"])
def test_a_part_is_not_a_runnable_config(how):
    name = "parts/paper" if how == "name" else str(CONFIG_DIR / "parts" / "paper.yaml")
    msg = error_of(name)
    assert msg.startswith(f"--config {name!r}: a config part") and "defaults: [parts/paper" in msg


def test_user_yaml_starts_from_shipped_parts_then_its_own_keys(tmp_path: Path):
    path = write(
        tmp_path / "mine.yaml",
        "defaults: [parts/paper, parts/task_math, parts/qwen2.5_3b]\ntrain:\n  lr: 2.0e-6\n  output_dir: out/train\n",
    )
    cfg = load_config(str(path), ["train.num_steps=10"])
    assert cfg.vstar.num_samples == 8 and cfg.train.rollout_batch_size == 256  # parts/paper
    assert cfg.data.task == "math" and cfg.reward.fn == "math"  # parts/task_math
    assert cfg.model.path == "Qwen/Qwen2.5-3B" and cfg.train.micro_batch_size == 2  # parts/qwen2.5_3b
    assert cfg.train.lr == 2e-6 and cfg.train.output_dir == "out/train"  # the file's own keys win
    assert cfg.train.num_steps == 10  # the command line wins over everything
    assert config_files(str(path)) == [
        *(CONFIG_DIR / f"{p}.yaml" for p in ("parts/paper", "parts/task_math", "parts/qwen2.5_3b")),
        path,
    ]


def test_defaults_are_merged_in_order_later_wins(tmp_path: Path):
    for order, (stage, micro, model) in {
        "parts/qwen2.5_7b, parts/qwen2.5_3b": (2, 2, "Qwen/Qwen2.5-3B"),
        "parts/qwen2.5_3b, parts/qwen2.5_7b": (3, 1, "Qwen/Qwen2.5-7B"),
    }.items():
        path = write(tmp_path / "order.yaml", f"defaults: [{order}]\n")
        t = load_config(str(path))
        assert (t.train.zero_stage, t.train.micro_batch_size, t.model.path) == (stage, micro, model)


def test_defaults_may_name_a_shipped_config_with_its_own_defaults(tmp_path: Path):
    path = write(tmp_path / "grpo.yaml", "defaults: [gsm8k_qwen2.5_7b]\ntrain:\n  algo: grpo\n")
    cfg = load_config(str(path))
    assert cfg == load_config("gsm8k_qwen2.5_7b", ["train.algo=grpo"])


def test_a_file_without_defaults_is_unchanged_and_defaults_may_be_empty(tmp_path: Path):
    path = write(tmp_path / "none.yaml", "defaults: []\nvstar:\n  num_samples: 4\n")
    assert load_config(str(path)) == load_config(None, ["vstar.num_samples=4"])


def test_unknown_part_names_the_file_and_suggests(tmp_path: Path):
    path = write(tmp_path / "typo.yaml", "defaults: [parts/papr]\n")
    msg = error_of(str(path))
    assert msg.startswith(f"{path}: defaults entry 'parts/papr' is not a shipped config or part")
    assert "Did you mean 'parts/paper'?" in msg


@pytest.mark.parametrize("value", ["parts/paper", "{a: 1}", "[1]", "[null]"])
def test_defaults_must_be_a_list_of_names(tmp_path: Path, value):
    path = write(tmp_path / "bad.yaml", f"defaults: {value}\n")
    assert error_of(str(path)).startswith(f"{path}: 'defaults' must be a list of shipped config names")


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for apo_ray/configs with parts the tests write."""
    d = tmp_path / "configs"
    (d / "parts").mkdir(parents=True)
    monkeypatch.setattr(config_module, "CONFIG_DIR", d)
    return d


def test_defaults_cycle_names_the_file(tmp_path: Path, config_dir: Path):
    a = write(config_dir / "parts" / "a.yaml", "defaults: [parts/b]\n")
    b = write(config_dir / "parts" / "b.yaml", "defaults: [parts/a]\n")
    path = write(tmp_path / "run.yaml", "defaults: [parts/a]\n")
    msg = error_of(str(path))
    assert msg.startswith(f"{b}: defaults cycle: ") and str(a) in msg
    write(config_dir / "parts" / "self.yaml", "defaults: [parts/self]\n")
    path = write(tmp_path / "self.yaml", "defaults: [parts/self]\n")
    assert "defaults cycle" in error_of(str(path))


def test_a_part_listed_twice_is_not_a_cycle(tmp_path: Path, config_dir: Path):
    write(config_dir / "parts" / "lr.yaml", "train:\n  lr: 1.0e-5\n")
    write(config_dir / "parts" / "both.yaml", "defaults: [parts/lr]\ntrain:\n  beta2: 0.01\n")
    path = write(tmp_path / "run.yaml", "defaults: [parts/lr, parts/both]\n")
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.train.beta2) == (1e-5, 0.01)


def test_errors_in_a_part_name_the_part(tmp_path: Path, config_dir: Path):
    part = write(config_dir / "parts" / "bad.yaml", "vstar:\n  betaa1: 2\n")
    path = write(tmp_path / "run.yaml", "defaults: [parts/bad]\n")
    msg = error_of(str(path))
    assert msg.startswith(f"{part}: unknown config key 'vstar.betaa1'")
    write(part, "train:\n  algo: ppo\n")
    assert error_of(str(path)).endswith(f"got 'ppo' ({part})")


def test_defaults_stay_inside_the_config_dir(tmp_path: Path, config_dir: Path):
    write(tmp_path / "outside.yaml", "train:\n  lr: 1.0e-5\n")
    path = write(tmp_path / "run.yaml", "defaults: [../outside]\n")
    assert "defaults entry '../outside' is not a shipped config or part" in error_of(str(path))
