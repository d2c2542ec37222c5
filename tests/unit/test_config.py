"""The typed config: YAML then dotlist merging, errors that name the key, every validation rule,
and lossless round trips (save_config -> load_config, to_dict -> config_from_dict)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from apo_ray.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
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
