"""Bad inputs refused before any cluster work, one line each, exit 2; strict JSON; nothing half-written.

Pure tests: no Ray is started (the checks run before it). The integration counterparts (faults
during real runs) are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apo_ray.config import load_config
from apo_ray.errors import ApoRayError, ConfigError, DivergedError, StorageError, user_error
from apo_ray.metrics import read_metrics, truncate_metrics
from apo_ray.model import check_model
from apo_ray.rewards import check_reward_fn, checked_reward
from apo_ray.storage import fs_write_bytes, get_fs, strict_json
from apo_ray.train.checkpoint import COMPLETE, check_resume, find_checkpoints, resolve_checkpoint
from apo_ray.train.output import RunDir

# ---------------------------------------------------------------- the reward contract


def _two_args_returns_text(completion, answer):
    return "1"


def _returns_nan(completion, answer):
    return float("nan")


def _one_arg(completion):
    return 1.0


def _raises(completion, answer):
    raise KeyError("answer")


@pytest.mark.parametrize("spec", ["builtins:eval", "os:system", "pty:spawn", "subprocess:call", "shutil:rmtree"])
def test_standard_library_callables_are_refused_without_being_called(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config key 'reward.fn': .*standard-library module"):
        checked_reward("arith", spec, f"touch {tmp_path}/ran")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("_two_args_returns_text", "returned '1' \\(str\\).*finite number"),
        ("_returns_nan", "returned nan"),
        ("_one_arg", "must accept two arguments"),
        ("_raises", "raised on a sample .*KeyError"),
    ],
)
def test_reward_that_breaks_the_contract_is_refused_naming_it(name, message):
    spec = f"{__name__}:{name}"
    with pytest.raises(ValueError, match=message):
        check_reward_fn(spec, "82")
    with pytest.raises(ConfigError, match=rf"^config key 'reward.fn': .*{name}"):
        checked_reward("arith", spec, "82")


def test_unimportable_reward_module_is_refused_at_the_driver():
    with pytest.raises(ConfigError, match=r"reward.fn.*cannot import module 'no_such_module_xyz'"):
        checked_reward("arith", "no_such_module_xyz:fn", "82")


def test_builtin_rewards_pass_the_contract():
    assert checked_reward("arith", None, "82") == "arith"
    assert checked_reward("gsm8k", None, "72") == "gsm8k"
    assert checked_reward("math", "math", "\\frac{1}{2}") == "math"


def test_stage1_reward_is_checked_under_the_key_that_names_it(tmp_path):
    """Stage 1 scores with vstar.reward_fn when set (else reward.fn), checked before Ray starts."""
    from apo_ray import vstar
    from apo_ray.config import vstar_reward

    model = _model_dir(tmp_path, **QWEN, max_position_embeddings=512)
    base = ["data.arith.num_train=4", f"model.path={model}", f"vstar.output_dir={tmp_path / 'v'}"]
    assert vstar_reward(load_config("demo", base)) == ("reward.fn", None)
    cfg = load_config("demo", [*base, "reward.fn=arith", "vstar.reward_fn=no_such_module_xyz:fn"])
    assert vstar_reward(cfg) == ("vstar.reward_fn", "no_such_module_xyz:fn")
    with pytest.raises(
        ConfigError, match=r"^config key 'vstar.reward_fn': .*cannot import module 'no_such_module_xyz'"
    ):
        vstar.run(cfg)
    with pytest.raises(ConfigError, match=r"^config key 'reward.fn': .*cannot import module 'no_such_module_xyz'"):
        vstar.run(load_config("demo", [*base, "reward.fn=no_such_module_xyz:fn"]))


# ---------------------------------------------------------------- the model, before Ray starts


def _model_dir(tmp_path: Path, **config) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


QWEN = {"model_type": "qwen2", "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 128}


def test_default_config_fits_the_tiny_model_recipe():
    from apo_ray.model.tiny import TinyRecipe

    s = load_config().sampling
    assert s.max_prompt_tokens + s.max_tokens <= TinyRecipe().max_position_embeddings


def test_too_long_for_the_model_is_refused_naming_the_keys(tmp_path):
    d = _model_dir(tmp_path, **QWEN, max_position_embeddings=512)
    check_model(str(d), load_config("demo"))  # 32 + 8 tokens
    with pytest.raises(ConfigError, match=r"^config key 'sampling.max_tokens': .*256 \+ 1024 = 1280 .* 512 positions"):
        check_model(str(d), load_config())


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused(tmp_path):
    d = _model_dir(tmp_path, **QWEN, max_position_embeddings=512)
    with pytest.raises(ConfigError, match=r"^config key 'engine.tensor_parallel_size': 8 does not divide the 2"):
        check_model(str(d), load_config("demo", ["engine.tensor_parallel_size=8", "train.placement=separate"]))


def test_a_config_without_the_usual_fields_is_read_by_transformers(tmp_path):
    # GPT-2 names its positions n_positions (transformers maps max_position_embeddings onto it)
    d = _model_dir(tmp_path, model_type="gpt2", n_positions=16, n_head=2)
    with pytest.raises(ConfigError, match=r"^config key 'sampling.max_tokens': .* 16 positions"):
        check_model(str(d), load_config("demo"))


def test_checking_a_plain_model_config_imports_neither_transformers_nor_torch(tmp_path):
    d = _model_dir(tmp_path, **QWEN, max_position_embeddings=512)
    code = (
        "import sys; from apo_ray.config import load_config; from apo_ray.model import check_model; "
        f"check_model({str(d)!r}, load_config('demo')); print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # a Stage 1 driver needs neither (~2.5 s of its start)


@pytest.mark.parametrize("content", ["{}", "not json"])
def test_unreadable_model_config_is_one_line(tmp_path, content):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=r"^config key 'model.path': transformers cannot read") as e:
        check_model(str(d), load_config("demo"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- one line, exit 2, for every user error


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apo_ray.cli", *argv], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["show-config", "--config", "bad.yaml"], "bad.yaml: not valid YAML: line 3, column 2"),
        (["vstar", "--config", "bad.yaml"], "bad.yaml: not valid YAML: line 3, column 2"),
        (["show-config", "--config", "demo", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["export", "nowhere", "out"], "export: 'nowhere' is neither a Stage 2 checkpoint"),
        (["train", "--config", "demo", "train.output_dir=afile"], "config key 'train.output_dir'"),
        (["pipeline", "--config", "demo", "train.vstar_dir=elsewhere"], "config key 'train.vstar_dir'"),
        (["pipeline", "--config", "demo", "vstar.output_dir=afile", "train.vstar_dir=afile"], "'vstar.output_dir'"),
        (
            ["train", "--config", "demo", "train.output_dir=nosuch://bucket/x"],
            "config key 'train.output_dir': cannot open",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, argv, expected):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: 1e-4\n bad indent: 3\n")
    (tmp_path / "afile").write_text("a file, not a directory")
    done = _run_cli(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr[-2000:]


def test_user_error_is_found_inside_wrappers():
    inner = DivergedError("step 3: non-finite loss nan")
    try:
        try:
            raise inner
        except DivergedError as e:
            raise RuntimeError("worker group failed") from e
    except RuntimeError as outer:
        assert user_error(outer) is inner

    class Wrapped(Exception):  # the shape of ray.exceptions.RayTaskError: the original in `.cause`
        def __init__(self, cause):
            super().__init__("Traceback ...\n" * 5)
            self.cause = cause

    assert user_error(Wrapped(inner)) is inner
    assert user_error(ValueError("a bug")) is None


def test_user_error_is_found_in_ray_train_failures():
    """Ray Train's own exception types: each rank's failure, and the controller's."""
    from ray.train import ControllerError, WorkerGroupError

    inner = ConfigError("config key 'train.output_dir': local, but the learners span 2 nodes")
    group = WorkerGroupError("rank 1 failed", {1: inner, 0: RuntimeError("collective aborted")})
    assert user_error(group) is inner
    assert user_error(WorkerGroupError("a bug", {0: ValueError("a bug")})) is None
    assert user_error(ControllerError(inner)) is inner


# ---------------------------------------------------------------- strict JSON


def test_strict_json_writes_null_for_non_finite_values():
    import numpy as np

    text = strict_json({"a": float("nan"), "b": [float("inf"), -math.inf, 1.5], "c": np.float64("nan"), "d": "inf"})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": None, "d": "inf"}
    assert "NaN" not in text and "Infinity" not in text


def test_metrics_jsonl_is_strict_and_truncated_on_resume(tmp_path):
    from apo_ray.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False, dashboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": float("nan") if step == 2 else 0.5})
    logger.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text.splitlines()[1])["loss"] is None
    truncate_metrics(tmp_path / "metrics.jsonl", 3)  # resumed from the step-3 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


# ---------------------------------------------------------------- checkpoints: complete or not there


def _checkpoint(out: Path, step: int, complete: bool) -> Path:
    d = out / "ray" / f"step_{step:06d}"
    (d / "hf").mkdir(parents=True)
    (d / "hf" / "config.json").write_text("{}")
    if complete:
        (d / COMPLETE).touch()
    return d


def test_a_checkpoint_killed_while_saving_is_never_the_latest(tmp_path):
    good = _checkpoint(tmp_path, 4, complete=True)
    _checkpoint(tmp_path, 6, complete=False)  # its save was cut off: no completion marker
    assert find_checkpoints(RunDir(str(tmp_path))) == [str(good)]
    assert resolve_checkpoint(tmp_path) == good
    assert check_resume({}, RunDir(str(tmp_path)), "auto") == 4


def _saved_config(out: Path, *overrides: str) -> dict:
    from apo_ray.config import save_config, to_dict

    cfg = load_config("demo", list(overrides))
    save_config(cfg, out)
    return to_dict(cfg)


def test_rerun_with_other_maths_is_refused_listing_what_differs(tmp_path):
    saved = _saved_config(tmp_path)
    _checkpoint(tmp_path, 2, complete=True)
    from apo_ray.config import to_dict

    changed = to_dict(load_config("demo", ["train.lr=3e-4", "train.beta2=0.1", "train.vstar_dir=elsewhere"]))
    with pytest.raises(ConfigError) as e:
        check_resume(changed, RunDir(str(tmp_path)), "auto")
    msg = str(e.value)
    for part in (f"train.lr {saved['train']['lr']} -> 0.0003", "train.beta2 0.05 -> 0.1", "train.vstar_dir"):
        assert part in msg, msg
    # Steps, cadence and loggers may change: that resumes.
    same = to_dict(load_config("demo", ["train.num_steps=800", "train.save_every=10", "train.tensorboard=false"]))
    assert check_resume(same, RunDir(str(tmp_path)), "auto") == 2


def test_stage1_reward_is_maths_and_a_run_saved_before_that_key_existed_resumes(tmp_path):
    import yaml

    from apo_ray.config import to_dict

    _saved_config(tmp_path)
    _checkpoint(tmp_path, 2, complete=True)
    with pytest.raises(ConfigError, match=r"vstar.reward_fn None -> 'gsm8k_flexible'"):
        check_resume(to_dict(load_config("demo", ["vstar.reward_fn=gsm8k_flexible"])), RunDir(str(tmp_path)), "auto")
    # A config.yaml written before vstar.reward_fn existed: that run scored Stage 1 with reward.fn (the default).
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["vstar"]["reward_fn"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume(to_dict(load_config("demo")), RunDir(str(tmp_path)), "auto") == 2


def test_resume_modes(tmp_path):
    cfg = _saved_config(tmp_path)
    assert (
        check_resume(cfg, RunDir(str(tmp_path)), "auto") == 0 and check_resume(cfg, RunDir(str(tmp_path)), "never") == 0
    )
    with pytest.raises(ConfigError, match="train.resume': must"):
        check_resume(cfg, RunDir(str(tmp_path)), "must")
    _checkpoint(tmp_path, 2, complete=True)
    assert check_resume(cfg, RunDir(str(tmp_path)), "must") == 2
    with pytest.raises(ConfigError, match="train.resume': never"):
        check_resume(cfg, RunDir(str(tmp_path)), "never")


# ---------------------------------------------------------------- a full disk


FULL_DISK = r"""
import os, sys
from apo_ray.errors import StorageError
from apo_ray.storage import fs_write_bytes, get_fs
fs, root = get_fs(sys.argv[1])
fs_write_bytes(fs, f"{root}/shard-00000.parquet", b"old and complete")
try:
    fs_write_bytes(fs, f"{root}/shard-00000.parquet", b"x" * (2 << 20))  # 2 MiB into a 1 MiB filesystem
except StorageError as e:
    print("ERROR", e)
print("FILES", sorted(os.listdir(root)))
print("CONTENT", open(f"{root}/shard-00000.parquet", "rb").read().decode())
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tmp_path):
    """A real ENOSPC: a 1 MiB tmpfs mounted in a private mount namespace (no root needed on the host)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    cmd = f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} {script} {mnt}"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert "No space left on device" in out["ERROR"] and "shard-00000.parquet" in out["ERROR"]
    assert out["FILES"] == "['shard-00000.parquet']"  # no temp file left behind
    assert out["CONTENT"] == "old and complete"  # the complete file was not replaced by a partial one


def test_write_error_is_a_storage_error(tmp_path):
    fs, root = get_fs(str(tmp_path))
    with pytest.raises(StorageError, match="cannot write"):
        fs_write_bytes(fs, f"{root}/no/such/dir/file", b"x")
    assert isinstance(StorageError("x"), ApoRayError)


# ---------------------------------------------------------------- divergence stops the run


def test_non_finite_step_stops_with_the_step_and_writes_the_reason(tmp_path):
    from apo_ray.train.recipe import ERROR_FILE, check_finite

    check_finite(3, {"loss": 0.5, "kl": 0.1, "grad_norm": 2.0}, RunDir(str(tmp_path)))
    check_finite(3, {"loss": 0.5, "kl": 0.1, "grad_norm": float("nan")}, RunDir(str(tmp_path)))  # no norm reported
    assert not (tmp_path / ERROR_FILE).exists()
    for bad in ({"loss": float("nan"), "kl": 0.1}, {"loss": 0.5, "kl": 0.1, "grad_norm": float("inf")}):
        with pytest.raises(DivergedError, match=r"^training diverged at step 7: non-finite"):
            check_finite(7, {"grad_norm": 1.0, **bad}, RunDir(str(tmp_path)))
    saved = json.loads((tmp_path / ERROR_FILE).read_text())
    assert "step 7" in saved["error"] and "Lower train.lr" in saved["error"]
