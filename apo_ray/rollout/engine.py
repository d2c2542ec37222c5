"""The rollout engine: one ``vllm.LLM`` that samples N completions per prompt and takes new weights.

What: `RolloutEngine` is a plain class (Stage 1 samplers, Stage 2 rollout replicas and eval
workers wrap it with ``ray.remote(...)`` where they create actors). ``generate`` sends one
request per prompt with ``SamplingParams(n=N)`` and returns token ids, text, finish reason and
the engine's log-prob of every sampled token. ``update_weights_from_shm`` (a shared mapping of a
file in /dev/shm) and ``update_weights_from_file`` reload weights on the CPU (see `worker_ext`);
the GPU backends drive vLLM's
native weight-transfer API through ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` (see `weight_sync`).

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``: log-softmax of the
logits after temperature (and top-k/top-p, which we leave off), i.e. log of pi(.|x)^(1/T)
renormalised, which is what the learner computes (`apo_ray.algo.logprobs` with the same
temperature). At temperature 1 and top_p 1 this equals vLLM's default "raw_logprobs". With
top_p < 1 the engine's log-probs are renormalised over the nucleus and differ from the
learner's; A*-PO uses top_p = 1.

Seeds: prompt i gets ``seed + i * n``; vLLM gives the j-th of its n samples ``seed + i*n + j``,
so every sample in a call has its own random stream and a call is reproducible.

Devices: on vLLM-CPU the KV cache is `cpu_kvcache_gib` (vLLM's kv_cache_memory_bytes; vLLM's
older VLLM_CPU_KVCACHE_SPACE variable, which would override it, is dropped from this process's
environment); sleep mode is a no-op there. The GPU-only parts (sleep mode, the native
weight-transfer engine) are written from the vLLM 0.32 sources and are not exercised by the
CPU test suite; they are marked "GPU path" below.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WORKER_EXTENSION = "apo_ray.rollout.worker_ext.WeightSyncExtension"
PROMPT_CACHE_SIZE = 1 << 20  # prompts whose token ids an engine keeps (`RolloutEngine._token_prompts`)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token (empty if not requested)
    finish_reason: str  # "stop" | "length"


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)  # n of them, in sample order


def _sync_backend(weight_sync: bool | str, on_cpu: bool) -> str | None:
    """Which weight-sync backend the engine is built for: None, "shm", "local", "ipc" or "nccl"."""
    if weight_sync is False or weight_sync is None:
        return None
    if weight_sync is True:
        return "shm" if on_cpu else "ipc"
    if weight_sync not in ("shm", "local", "ipc", "nccl"):
        raise ValueError(f"weight_sync must be a bool or one of shm|local|ipc|nccl, got {weight_sync!r}")
    if on_cpu and weight_sync not in ("shm", "local"):
        raise ValueError(f"weight_sync={weight_sync!r} needs GPUs; vLLM-CPU supports 'shm' and 'local'")
    if weight_sync == "local" and not on_cpu:
        raise ValueError("weight_sync='local' (the engine in its learner's process) is vLLM-CPU only")
    return weight_sync


def single_process_cpu_kwargs() -> dict:
    """`vllm.LLM` kwargs (and env) that run a CPU engine in the calling process.

    One process instead of three (this one, EngineCore, a multiproc Worker), each of which
    imports vLLM: on 2 cores the engine starts in ~2 s instead of ~16 s (measured, tiny model,
    eager), with the same samples. Our actors hold one engine each. The env var is a default:
    a user's VLLM_ENABLE_V1_MULTIPROCESSING wins.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return {"distributed_executor_backend": "uni"}


def prefix_cache_in_use(enabled: bool, max_model_len: int, block_size: int) -> bool:
    """Whether an engine can ever hold a cached KV block: vLLM caches full blocks only, so sequences
    shorter than a block (the demo's 40 tokens; vLLM-CPU's blocks hold 128) leave nothing cached."""
    return bool(enabled) and max_model_len >= block_size


def sampled_logprobs(token_ids: list[int], flat) -> list[float]:
    """The log-prob of each sampled token from vLLM's `FlatLogprobs` of a completion.

    With ``logprobs=0`` each position holds the sampled token's entry (vLLM puts it first, before
    any top-k ones); its token id is checked against the completion's.
    """
    out = []
    for tok, start, end in zip(token_ids, flat.start_indices, flat.end_indices):
        if end <= start or flat.token_ids[start] != tok:
            raise RuntimeError(f"vLLM returned no log-prob for sampled token {tok}")
        out.append(flat.logprobs[start])
    if len(out) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(out)} log-probs for {len(token_ids)} tokens")
    return out


def skip_logprob_token_text(llm) -> bool:
    """Have `llm`'s front end leave out the text of each log-prob entry's token.

    vLLM decodes the token of every log-prob entry to text (a tokenizer call per sampled token,
    kept as the entry's ``decoded_token``), which apo-ray never reads: ~1.6 ms of a 64-prompt demo
    generate, 6 % (measured). vLLM has no switch for it but ``detokenize=False``, which also drops
    the completion's text. So each new request's log-prob processor gets no tokenizer (what
    ``detokenize=False`` gives it); the completion's own detokenizer keeps it, and the token ids
    and log-probs are the same (tested). Returns False, changing nothing, where this vLLM's output
    processor is laid out otherwise.
    """
    proc = getattr(llm.llm_engine, "output_processor", None)
    states, add = getattr(proc, "request_states", None), getattr(proc, "add_request", None)
    if not isinstance(states, dict) or add is None:
        return False

    @functools.wraps(add)
    def add_request(request, *args, **kwargs):
        add(request, *args, **kwargs)
        lp = getattr(states.get(request.request_id), "logprobs_processor", None)
        if lp is not None and hasattr(lp, "tokenizer"):
            lp.tokenizer = None

    proc.add_request = add_request
    return True


CPU_GEMM_KERNELS = ("onednn", "torch")  # engine.cpu_gemm


class RolloutEngine:
    """A vLLM engine for sampling, with in-place weight updates.

    Args:
        model_path: HF model directory (or hub id) that vLLM loads.
        dtype: "float32" | "bfloat16" | "float16" | "auto".
        max_model_len: prompt + completion tokens.
        seed: engine seed (used by requests that carry no seed of their own).
        tensor_parallel_size, gpu_memory_utilization, enforce_eager, max_num_seqs: as in vLLM.
        enable_sleep_mode: GPU only; lets ``sleep`` free GPU memory while a colocated learner trains.
        weight_sync: False, or the backend the learner will push weights with: "shm" (file in
            /dev/shm, CPU or GPU), "local" (vLLM-CPU, the engine built in the learner's own
            process: `load_weights`), "ipc" (colocated GPUs), "nccl" (separate GPUs). True means
            "shm" on CPU and "ipc" on GPU.
        cpu_threads: vLLM-CPU only: torch threads of the engine (None: this process's default;
            Ray gives an actor as many as it reserved CPUs, 1 for a zero-CPU actor).
        cpu_gemm: vLLM-CPU with weight_sync only: the kernel of every linear layer after each sync,
            "onednn" (vLLM-CPU's, rebuilt at every sync) or "torch" (torch's linear on the weight;
            nothing to rebuild). See `worker_ext.repack_cpu_gemms`.
        cpu_kvcache_gib: vLLM-CPU only: the KV cache's size in GiB (vLLM's kv_cache_memory_bytes;
            VLLM_CPU_KVCACHE_SPACE, which vLLM would let replace it, is dropped from this process).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.45,
        enforce_eager: bool = False,
        max_num_seqs: int = 256,
        enable_sleep_mode: bool = False,
        weight_sync: bool | str = False,
        cpu_threads: int | None = None,
        cpu_gemm: str = "onednn",
        cpu_kvcache_gib: float = 1.0,
    ):
        t0 = time.perf_counter()
        if cpu_gemm not in CPU_GEMM_KERNELS:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_KERNELS}; got {cpu_gemm!r}")
        if cpu_gemm == "torch" and not enforce_eager:  # vLLM-CPU's compiled graph keeps its traced kernels
            raise ValueError("cpu_gemm='torch' needs enforce_eager=True")
        if not cpu_kvcache_gib > 0:
            raise ValueError(f"cpu_kvcache_gib must be > 0; got {cpu_kvcache_gib!r}")
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)  # before vLLM's CPU worker starts: it refuses it afterwards
        self.sync_backend = _sync_backend(weight_sync, self.on_cpu)
        kwargs: dict = dict(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
            logprobs_mode="processed_logprobs",
        )
        if self.sync_backend is not None:
            kwargs["worker_extension_cls"] = WORKER_EXTENSION
        if self.on_cpu:
            # vLLM-CPU lets VLLM_CPU_KVCACHE_SPACE (whole GiB) replace kv_cache_memory_bytes; without
            # either it sizes the cache from free memory. The engine's own size is the one source.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(cpu_kvcache_gib * 2**30)
        if self.on_cpu and tensor_parallel_size == 1:
            kwargs.update(single_process_cpu_kwargs())
        # Its worker runs in this process: `load_weights` may hand it tensors (nothing is serialised).
        self.in_process = (
            self.on_cpu and tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        )
        if self.sync_backend == "local" and not self.in_process:
            raise ValueError(
                "weight_sync='local' needs vLLM's worker in this process (tensor_parallel_size=1, "
                f"VLLM_ENABLE_V1_MULTIPROCESSING=0; it is {os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING')!r})"
            )
        self.sleep_enabled = enable_sleep_mode and not self.on_cpu
        if not self.on_cpu:
            # GPU path (untested here): memory share, sleep mode, native weight transfer.
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
            if tensor_parallel_size > 1:
                # The owning actor reserved the tp GPUs (`apo_ray.launch`); vLLM's "ray" executor
                # would ask Ray for tp more from inside it. "mp" runs the tp workers in them.
                kwargs["distributed_executor_backend"] = "mp"
            if self.sync_backend in ("ipc", "nccl"):
                kwargs["weight_transfer_config"] = {"backend": self.sync_backend}
            if self.sync_backend == "ipc":
                # The worker unpickles the CUDA IPC handles (`ipc_handles_pickled`) only with
                # this set; worker processes inherit it from here.
                os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        # vLLM runs full garbage collections while it starts (five on CPU) and freezes its heap at
        # the end (undone at its shutdown); each walks every object its imports made (torch,
        # transformers, vLLM). Frozen first, that heap is skipped: ~0.6 s of an engine start here.
        gc.collect()
        gc.freeze()
        self.llm = LLM(**kwargs)
        self.logprob_text_skipped = skip_logprob_token_text(self.llm)
        if self.on_cpu and self.sync_backend is not None and cpu_gemm != "onednn":
            self.llm.collective_rpc("apo_set_cpu_gemm", args=(cpu_gemm,))
        self._prompt_ids: dict[str, list[int]] = {}  # prompt -> token ids (`_token_prompts`)
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.prefix_cached = prefix_cache_in_use(cache.enable_prefix_caching, max_model_len, cache.block_size)
        self.start_s = time.perf_counter() - t0
        log.info("vLLM engine for %s ready in %.1f s (weight sync: %s)", model_path, self.start_s, self.sync_backend)

    # ------------------------------------------------------------ sampling

    def ready(self) -> bool:
        return True

    def tokenizer_eos_id(self) -> int | None:
        return self.llm.get_tokenizer().eos_token_id

    def shutdown(self) -> None:
        """Stop vLLM's engine-core and worker processes now (otherwise they stop when this object is collected)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        seed: int | None = None,
        logprobs: bool = False,
    ) -> list[PromptResult]:
        """Sample ``n`` completions for each prompt (one vLLM request per prompt), in prompt order.

        Args:
            seed: None for the engine's stream; else prompt i uses ``seed + i * n`` (its samples
                ``seed + i*n + j``), so equal arguments give equal results.
            logprobs: also return the engine's log-prob of each sampled token (see module doc).
        """
        from vllm import SamplingParams

        if not prompts:
            return []
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=None if seed is None else seed + i * n,
                logprobs=0 if logprobs else None,  # 0: only the sampled token's log-prob
                flat_logprobs=True,  # plain lists, not a dict + Logprob object per token
                # Made here for this one request and never reused: vLLM need not deep-copy it (as
                # its own OpenAI server does; ~1.5 ms of a 64-prompt demo generate).
                skip_clone=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False)
        results = []
        for out in outputs:
            comps = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = sampled_logprobs(ids, c.logprobs) if logprobs else []
                comps.append(Completion(text=c.text, token_ids=ids, logprobs=lps, finish_reason=str(c.finish_reason)))
            results.append(PromptResult(prompt_token_ids=list(out.prompt_token_ids), completions=comps))
        return results

    def _token_prompts(self, prompts: list[str]) -> list:
        """The prompts as token ids, each tokenized once per engine (Stage 2 draws the same prompts
        every epoch): ~10 % of a demo generate call was vLLM tokenizing them again (measured).
        The ids are the ones vLLM makes of the text (the tokenizer's own call, special tokens added)."""
        from vllm.inputs import TokensPrompt

        cache = self._prompt_ids
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        if todo:
            if len(cache) + len(todo) > PROMPT_CACHE_SIZE:
                cache.clear()
            cache.update(zip(todo, self.llm.get_tokenizer()(todo)["input_ids"]))
        return [TokensPrompt(prompt_token_ids=cache[p], prompt=p) for p in prompts]

    # ------------------------------------------------------------ weights

    def _drop_prefix_cache(self) -> None:
        """After new weights: cached KV blocks were computed with the old ones. Skipped where nothing
        can be cached (`prefix_cache_in_use`): vLLM's reset walks every block of the KV cache, 1.6 ms
        of the demo's 6.5 ms sync (cProfile)."""
        if self.prefix_cached:
            self.llm.reset_prefix_cache()

    def update_weights_from_shm(self, path: str, token: str) -> None:
        """Reload all weights from the learner's shared weight file: mapped once per `token`, read
        through the mapping afterwards (`worker_ext.WeightSyncExtension.apo_reload_from_shm`)."""
        if self.sync_backend is None:
            raise RuntimeError("RolloutEngine was built with weight_sync=False; no worker extension to load weights")
        self.llm.collective_rpc("apo_reload_from_shm", args=(str(path), token))
        self._drop_prefix_cache()

    def load_weights(self, named_tensors) -> None:
        """Load (name, tensor) pairs of the full HF state dict, handed over in this process: the
        engine in its learner's process (weight_sync="local"), reading the learner's own tensors."""
        if self.sync_backend is None or not self.in_process:
            raise RuntimeError(
                "load_weights needs an engine built with weight_sync whose vLLM worker runs in this process "
                f"(vLLM-CPU, tensor_parallel_size 1); this one has weight_sync={self.sync_backend!r}, "
                f"in_process={self.in_process}"
            )
        self.llm.collective_rpc("apo_load_weights", args=(named_tensors,))
        self._drop_prefix_cache()

    def update_weights_from_file(self, path: str) -> None:
        """Reload all weights from a safetensors file of the full HF state dict (same node)."""
        if self.sync_backend is None:
            raise RuntimeError("RolloutEngine was built with weight_sync=False; no worker extension to load weights")
        self.llm.collective_rpc("apo_reload_from_file", args=(str(path),))
        # Cached KV blocks were computed with the old weights.
        self._drop_prefix_cache()

    # GPU path: vLLM's native weight-transfer API (ipc / nccl), driven by `weight_sync`.
    # Written from vllm/v1/worker/gpu_worker.py and vllm/v1/engine/async_llm.py; untested here.

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self._drop_prefix_cache()

    # ------------------------------------------------------------ memory (GPU path)

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory while the colocated learner trains.

        Level 1 offloads the weights to CPU memory and drops the KV cache; level 2 drops both
        (nothing is copied: every weight is overwritten by the sync after wake-up, but buffers
        the weight loader does not rewrite would be lost; untested here, see engine.sleep_level).
        No-op on CPU or when built without ``enable_sleep_mode``.
        """
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what `sleep` freed: ``tags=["weights"]`` first, sync, then ``["kv_cache"]`` keeps the
        peak low (vLLM's documented RLHF pattern); None restores both. No-op on CPU."""
        if self.sleep_enabled:
            self.llm.wake_up(tags=tags)
