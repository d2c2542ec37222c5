"""Every shipped config loads and validates, the paper configs carry the paper's defaults, and the
cluster specs (Ray autoscaler, KubeRay, Grafana) parse and agree with the project's pins, configs
and metric names."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from apo_ray.config import CONFIG_DIR, config_files, config_parts, load_config, shipped_configs

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PAPER_CONFIGS = [f"{task}_qwen2.5_{size}" for task in ("gsm8k", "math") for size in ("1.5b", "3b", "7b")]


def test_the_paper_configs_and_demo_are_shipped():
    assert set(PAPER_CONFIGS) | {"demo"} <= set(shipped_configs())


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_loads_and_validates(name):
    load_config(name)


@pytest.mark.parametrize("name", shipped_configs() + config_parts())
def test_shipped_yaml_is_plain_yaml_with_typed_numbers(name):
    # Other tools read these files with a plain YAML 1.1 parser: "1e-6" would be a string there.
    # The parts (apo_ray/configs/parts) are checked too: the paper configs take their numbers from them.
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert isinstance(raw, dict)
    assert all(isinstance(d, str) for d in raw.pop("defaults", []))
    for section in raw.values():
        for key, value in (section or {}).items():
            if key in ("lr", "beta1", "beta2", "temperature", "top_p", "weight_decay", "grad_clip"):
                assert isinstance(value, (int, float)), f"{name}: {key}={value!r} is not a number"


def test_demo_is_the_cpu_demo():
    cfg = load_config("demo")
    assert cfg.model.path == "tiny" and cfg.data.task == "arith" and cfg.data.train_source == "synthetic"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_defaults(name):
    cfg = load_config(name)
    assert cfg.vstar.num_samples == 8  # N
    assert cfg.vstar.beta1 == 0.5
    assert cfg.vstar.filter_unsolvable is False
    t = cfg.train
    assert t.algo == "astar_po"
    assert t.beta2 == 1e-3
    assert t.lr == 1e-6
    assert t.weight_decay == 0.01
    assert t.grad_clip == 1.0
    assert t.warmup_steps == 0
    assert (t.rollout_batch_size, t.mini_batch_size) == (256, 128)
    assert t.entropy_coef == 0.0
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.max_prompt_tokens, s.max_tokens) == (1.0, 1.0, 256, 1024)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_entropy_comment_mentions_official_value(name):
    # The file that sets entropy_coef last (the config itself or one of its `defaults:` parts).
    files = [f.read_text().splitlines() for f in config_files(name)]
    lines = [lines for lines in files if any(line.strip().startswith("entropy_coef:") for line in lines)][-1]
    i = next(i for i, line in enumerate(lines) if line.strip().startswith("entropy_coef:"))
    assert "0.001" in "\n".join(lines[i - 3 : i + 1])


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_is_composed_from_the_shipped_parts(name):
    task, _, size = name.split("_")
    parts = ["parts/paper.yaml", f"parts/task_{task}.yaml", f"parts/qwen2.5_{size}.yaml", f"{name}.yaml"]
    assert [f.resolve() for f in config_files(name)] == [(CONFIG_DIR / p).resolve() for p in parts]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_model_data_reward_and_outputs(name):
    task, _, size = name.split("_")
    cfg = load_config(name)
    assert cfg.model.path == f"Qwen/Qwen2.5-{size.upper()}"
    assert cfg.data.task == task
    if task == "gsm8k":  # what the paper's code used: strict online (Stage 2, eval), flexible offline (V*)
        assert (cfg.reward.fn, cfg.vstar.reward_fn) == ("gsm8k_strict", "gsm8k_flexible")
    else:
        assert (cfg.reward.fn, cfg.vstar.reward_fn) == (task, None)
    assert cfg.data.train_split == "train" and cfg.data.eval_split == "test"
    assert cfg.data.train_source.startswith("hf:") and cfg.data.eval_source.startswith("hf:")
    if task == "gsm8k":
        assert cfg.data.train_source == "hf:openai/gsm8k:main"
    assert cfg.vstar.output_dir == f"runs/{name}/vstar"
    assert cfg.train.vstar_dir == cfg.vstar.output_dir  # Stage 2 reads what Stage 1 wrote
    assert cfg.train.output_dir == f"runs/{name}/train"
    assert cfg.eval.output_dir == f"runs/{name}/eval"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_resources_for_4_h100(name):
    cfg = load_config(name)
    t = cfg.train
    assert t.num_learners == 4 and t.placement == "colocate"
    assert t.zero_stage == (3 if name.endswith("7b") else 2)
    assert (cfg.vstar.min_actors, cfg.vstar.max_actors) == (1, 4)
    assert cfg.engine.gpu_memory_utilization == (0.35 if name.endswith("7b") else 0.45)
    assert cfg.engine.tensor_parallel_size == 1


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_fits_an_80gb_gpu_by_the_memory_planner(name):
    from apo_ray.memory import plan_memory, shape_of

    cfg = load_config(name)
    plan = plan_memory(cfg, shape_of(cfg.model.path), gpu_gib=80.0, dtype="bfloat16")
    assert plan.fits and plan.peak_gib < 0.9 * 80, plan.table()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_grpo_baseline_is_a_command_line_switch(name):
    cfg = load_config(name, ["train.algo=grpo", "train.group_size=8"])
    assert cfg.train.algo == "grpo" and cfg.train.group_size == 8


# ---------------------------------------------------------------- cluster specs

AUTOSCALER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _ray_pin() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins ray"
    return m.group(1)


def _kube_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert set(AUTOSCALER_YAMLS) | set(KUBERAY_YAMLS) <= set(files)
    assert {p.name for p in KUBERAY_YAMLS} >= {"raycluster.yaml", "rayjob.yaml"}
    for p in files:
        assert _kube_docs(p), f"{p} is empty"


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=lambda p: p.name)
def test_autoscaler_yaml_matches_ray_schema(path):
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load(path.read_text())
    util.validate_config(util.prepare_config(config))  # the checks `ray up` runs before launching


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=lambda p: p.name)
def test_autoscaler_yaml_gpu_pool_scales_from_zero(path):
    config = yaml.safe_load(path.read_text())
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    assert workers and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    assert config["available_node_types"][head]["resources"] == {"CPU": 0}
    assert config["docker"]["image"] == f"rayproject/ray:{_ray_pin()}-py311-gpu"
    assert any("[gpu]" in c for c in config["setup_commands"])
    # torch for CUDA 13.0 before the project (vLLM 0.32's CUDA build runs on torch 2.13.0 + CUDA 13)
    torch_at = next(i for i, c in enumerate(config["setup_commands"]) if "torch==2.13.0" in c)
    assert "download.pytorch.org/whl/cu130" in config["setup_commands"][torch_at]
    assert torch_at < next(i for i, c in enumerate(config["setup_commands"]) if "[gpu]" in c)
    assert any("driver_version" in c and "< 580" in c for c in config["worker_setup_commands"])


def test_kuberay_documents_are_ray_v1_and_pin_the_same_ray():
    kinds = []
    for path in KUBERAY_YAMLS:
        for doc in _kube_docs(path):
            assert doc["apiVersion"] == "ray.io/v1"
            kinds.append(doc["kind"])
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert spec["rayVersion"] == _ray_pin()
            assert spec["enableInTreeAutoscaling"] is True
            for group in spec["workerGroupSpecs"]:
                assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
                limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1
    assert sorted(kinds) == ["RayCluster", "RayJob"]


def test_rayjob_cluster_is_the_raycluster():
    (cluster,) = _kube_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    (job,) = _kube_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_rayjob_entrypoint_runs_stage1_then_stage2_with_valid_configs():
    (job,) = _kube_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    commands = [shlex.split(c) for c in job["spec"]["entrypoint"].split("&&")]
    assert [Path(c[1]).name for c in commands] == ["vstar.py", "train.py"]
    loaded = []
    for argv in commands:
        i = argv.index("--config")
        name, overrides = argv[i + 1], argv[i + 2 :]
        assert name in shipped_configs()
        loaded.append(load_config(name, overrides))  # every override is a real key with a valid value
    stage1, stage2 = loaded
    assert stage2.train.vstar_dir == stage1.vstar.output_dir


def test_dockerfile_uses_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_pin()}-py311-gpu" in text
    assert '".[gpu]"' in text
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" in text


# ---------------------------------------------------------------- Grafana


def _exported_metric_names() -> list[str]:
    """Prometheus names of the metrics the code exports (Ray adds ray_; counters get _total)."""
    from apo_ray.metrics import DASHBOARD_KEYS

    names = [f"ray_apo_train_{k}" for k in DASHBOARD_KEYS]
    stage1 = (ROOT / "apo_ray" / "vstar" / "pipeline.py").read_text()
    counters = re.findall(r'Counter\(\s*"(apo_\w+)"', stage1)
    gauges = re.findall(r'Gauge\(\s*"(apo_\w+)"', stage1)
    assert counters and gauges
    return names + [f"ray_{c}_total" for c in counters] + [f"ray_{g}" for g in gauges]


def test_grafana_dashboard_parses_and_shows_every_exported_metric():
    dash = json.loads((CLUSTER / "grafana" / "apo_ray_dashboard.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for name in _exported_metric_names():
        assert re.search(rf"\b{name}\b", exprs), f"no panel shows {name}"
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "SessionName"}


def test_grafana_readme_names_every_exported_metric():
    text = (CLUSTER / "grafana" / "README.md").read_text()
    for name in _exported_metric_names():
        assert name in text
