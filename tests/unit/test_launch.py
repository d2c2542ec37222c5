"""The launch layer's one tensor-parallel policy, and the engine settings every stage shares (pure: no Ray started)."""

from __future__ import annotations

import pytest

from apo_ray.config import load_config
from apo_ray.errors import ConfigError
from apo_ray.launch import check_tensor_parallel, engine_actor_options, engine_spec, make_sync
from apo_ray.runtime import worker_env
from apo_ray.train.plan import make_plan


def test_engine_spec_reads_engine_and_sampling_once():
    cfg = load_config("demo", ["engine.tensor_parallel_size=2", "engine.max_num_seqs=32", "sampling.max_tokens=16"])
    spec = engine_spec(cfg, model_path="/m", dtype="bfloat16", seed=3)
    assert (spec.tensor_parallel_size, spec.max_num_seqs, spec.seed, spec.dtype) == (2, 32, 3, "bfloat16")
    assert spec.max_model_len == cfg.sampling.max_prompt_tokens + 16
    assert spec.enforce_eager is True and spec.weight_sync is False
    assert spec.cpu_gemm == "torch"  # the demo's; every other shipped config keeps vLLM's oneDNN kernels
    assert spec.cpu_kvcache_gib == cfg.engine.cpu_kvcache_gib
    assert engine_spec(load_config("gsm8k_qwen2.5_3b"), model_path="/m", dtype="bfloat16", seed=0).cpu_gemm == "onednn"


def test_an_unknown_cpu_gemm_kernel_is_refused_before_vllm_starts():
    from apo_ray.rollout.engine import RolloutEngine

    with pytest.raises(ValueError, match=r"cpu_gemm must be one of \('onednn', 'torch'\); got 'mkl'"):
        RolloutEngine("/nonexistent", cpu_gemm="mkl")
    with pytest.raises(ValueError, match=r"cpu_gemm='torch' needs enforce_eager=True"):
        RolloutEngine("/nonexistent", cpu_gemm="torch")


def test_the_torch_kernel_takes_a_bias_vllm_made_float32():
    """vLLM-CPU's small-GEMM path (bf16 on AMX CPUs) turns a layer's bias to float32 at load; after a
    sync with engine.cpu_gemm=torch the bf16 input meets that float32 bias."""
    import torch

    from apo_ray.rollout.worker_ext import torch_linear

    x, w, b = torch.randn(3, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(4)
    out = torch_linear(x, w, b)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.nn.functional.linear(x, w, b.bfloat16()))
    assert torch.equal(torch_linear(x.float(), w.float(), None), x.float() @ w.float().T)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_gpu_engine_actor_reserves_its_tensor_parallel_gpus(tp):
    assert engine_actor_options("cuda", tp, cpus_per_actor=2.0) == {"num_gpus": tp, "num_cpus": 1}
    assert engine_actor_options("cpu", tp, cpus_per_actor=2.0) == {"num_cpus": 2.0}


def test_colocate_with_tensor_parallel_is_refused_naming_the_key():
    check_tensor_parallel(load_config("demo"))
    check_tensor_parallel(load_config("demo", ["engine.tensor_parallel_size=2", "train.placement=separate"]))
    with pytest.raises(ConfigError, match=r"^config key 'engine.tensor_parallel_size': 2 .*train.placement=separate"):
        check_tensor_parallel(load_config("demo", ["engine.tensor_parallel_size=2"]))


def test_stage2_refuses_colocate_with_tensor_parallel_before_anything_starts(tmp_path):
    from apo_ray import train

    cfg = load_config("demo", ["engine.tensor_parallel_size=2", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size"):
        train.run(cfg)
    assert not (tmp_path / "out").exists()


def test_separate_tp2_on_gpus_syncs_over_nccl_with_engine_world_size_2():
    cfg = load_config("demo", ["engine.tensor_parallel_size=2", "train.placement=separate", "train.zero_stage=2"])
    plan = make_plan(cfg, "/m", "cuda", "arith")
    assert plan.sync_backend == "nccl" and plan.engine.weight_sync == "nccl"
    assert plan.engine.tensor_parallel_size == 2 and not plan.sleep_engine
    sync = make_sync(plan.engine, rank=0, run_id="t")
    assert type(sync).__name__ == "NcclWeightSync" and sync.engine_world_size == 2


@pytest.mark.parametrize(
    "device, placement, backend, sleeps",
    [("cpu", "colocate", "local", False), ("cuda", "colocate", "ipc", True), ("cuda", "separate", "nccl", False)],
)
def test_sync_backend_and_sleep_are_decided_once_in_the_plan(device, placement, backend, sleeps):
    plan = make_plan(load_config("demo", [f"train.placement={placement}", "train.zero_stage=2"]), "/m", device, "arith")
    assert (plan.sync_backend, plan.sleep_engine) == (backend, sleeps)
    assert plan.engine.weight_sync == backend and plan.engine.enable_sleep_mode == sleeps
    assert plan.dtype == ("bfloat16" if device == "cuda" else "float32")


@pytest.mark.parametrize(
    ("overrides", "device", "backend"),
    [
        ([], "cpu", "local"),  # the demo: one CPU learner builds its replica in its own process
        (["train.rollout_process=learner"], "cpu", "local"),
        (["train.rollout_process=actor"], "cpu", "shm"),
        (
            ["train.num_learners=2", "train.micro_batch_size=32"],
            "cpu",
            "shm",
        ),  # vLLM's worker would take over the 2-rank world
        (["engine.tensor_parallel_size=2", "train.placement=separate"], "cpu", "shm"),
        (["train.zero_stage=2"], "cuda", "ipc"),
    ],
)
def test_the_replica_runs_in_the_learners_process_where_it_can(overrides, device, backend):
    plan = make_plan(load_config("demo", overrides), "/m", device, "arith")
    assert plan.sync_backend == plan.engine.weight_sync == backend
    assert (
        type(make_sync(plan.engine, rank=0, run_id="t")).__name__
        == {
            "local": "LocalWeightSync",
            "shm": "ShmWeightSync",
            "ipc": "IpcWeightSync",
        }[backend]
    )


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["train.num_learners=2", "train.micro_batch_size=32"], "train.num_learners=2 vLLM's worker would take over"),
        (["engine.tensor_parallel_size=2", "train.placement=separate"], "engine.tensor_parallel_size=2 runs"),
    ],
)
def test_rollout_in_the_learner_where_it_cannot_be_is_refused_by_the_config(overrides, why):
    with pytest.raises(
        ConfigError, match=rf"^config key 'train.rollout_process': 'learner' is not possible here: .*{why}"
    ):
        load_config("demo", ["train.rollout_process=learner", *overrides])


def test_rollout_in_the_learner_on_gpus_is_refused_by_the_plan():
    cfg = load_config("demo", ["train.rollout_process=learner", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"^config key 'train.rollout_process': 'learner' .* on GPUs"):
        make_plan(cfg, "/m", "cuda", "arith")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_engine_actors_learners_and_replicas_run_at_niceness_0_not_rays_15(device):
    cfg = load_config("demo", ["train.zero_stage=2"])
    plan = make_plan(cfg, "/m", device, "arith")
    assert plan.env["RAY_worker_niceness"] == "0"  # Ray's raylet starts the worker at it (its job drivers use 0)
    assert worker_env(cfg, device)["RAY_worker_niceness"] == "0"  # Stage 1 and eval pools (`fan_out`)


def test_make_sync_needs_a_backend():
    cfg = load_config("demo")
    with pytest.raises(ValueError, match="weight-sync backend"):
        make_sync(engine_spec(cfg, model_path="/m", dtype="float32", seed=0), rank=0, run_id="t")


def test_bf16_with_zero0_is_refused_in_the_plan_before_any_worker_starts():
    with pytest.raises(ConfigError, match=r"^config key 'train.zero_stage': 0 with bfloat16"):
        make_plan(load_config("demo"), "/m", "cuda", "arith")  # demo: ZeRO-0; bf16 on GPUs
    make_plan(load_config("demo"), "/m", "cpu", "arith")  # float32 on CPU: fine


def test_a_learner_worker_reserves_its_colocated_replica_too():
    from apo_ray.launch import colocated_worker_resources

    # The replica asks Ray for nothing (it cannot wait for CPUs its learner's node lacks):
    # its learner's worker holds them.
    assert colocated_worker_resources("cpu", "colocate", 1.0) == {"CPU": 2.0}
    assert colocated_worker_resources("cuda", "colocate", 2.0) == {"CPU": 3.0, "GPU": 1.0}
    assert colocated_worker_resources("cuda", "separate", 2.0) == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("cpus_per_actor", "cores", "learners_here", "threads"),
    [
        (1.0, 2, 1, 2),  # the demo: learner and replica take turns on the worker's 2 reserved CPUs
        (1.0, 2, 2, 1),  # two learners on 2 cores: one core each, as before
        (2.0, 16, 1, 4),  # never more than the worker reserved
        (4.0, 2, 1, 2),  # nor more than the cores (Ray's CPUs are logical)
        (0.5, 8, 1, 1),
    ],
)
def test_a_cpu_learner_and_its_replica_use_the_cpus_reserved_for_both(
    monkeypatch, cpus_per_actor, cores, learners_here, threads
):
    import os

    from apo_ray.train.recipe import cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    cfg = load_config("demo", [f"resources.cpus_per_actor={cpus_per_actor}"])
    assert cpu_threads(cfg, learners_here) == threads


def test_an_outside_kv_cache_variable_is_ignored_with_a_warning(monkeypatch, caplog):
    cfg = load_config("demo")  # engine.cpu_kvcache_gib: 0.125
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with caplog.at_level("WARNING", logger="apo_ray"):
        env = worker_env(cfg, "cpu")
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # each engine passes its own size and drops the variable
    assert "VLLM_CPU_KVCACHE_SPACE=4 in the environment is ignored: engine.cpu_kvcache_gib=0.125" in caplog.text
    caplog.clear()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    worker_env(load_config("demo", ["engine.cpu_kvcache_gib=1"]), "cpu")  # the same size: nothing to say
    assert caplog.text == ""


def test_the_kv_cache_warning_compares_numbers_not_text(monkeypatch, caplog):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1.0")
    with caplog.at_level("WARNING", logger="apo_ray"):
        worker_env(load_config("demo", ["engine.cpu_kvcache_gib=1"]), "cpu")
    assert caplog.text == ""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with caplog.at_level("WARNING", logger="apo_ray"):
        worker_env(load_config("demo", ["engine.cpu_kvcache_gib=1"]), "cpu")
    assert "VLLM_CPU_KVCACHE_SPACE=lots in the environment is ignored" in caplog.text
