"""vLLM worker extension: reload the model's weights from a safetensors file.

What: `WeightSyncExtension` is mixed into every vLLM worker by passing
``worker_extension_cls="apo_ray.rollout.worker_ext.WeightSyncExtension"`` to ``vllm.LLM``;
the rollout engine then calls ``llm.collective_rpc("apo_reload_from_shm", args=(path, token))``
(or ``"apo_reload_from_file"``; an engine in its learner's process, ``"apo_load_weights"`` with the
learner's tensors themselves: in one process nothing is serialised).

Why a file: tensors passed inside ``collective_rpc`` arguments do not survive vLLM's msgpack
transport between processes (they arrive as lists), so the data plane is a safetensors file in
/dev/shm that the learner writes once (`apo_ray.rollout.weight_sync.write_weights_shm`) and both
sides map (`map_safetensors`): afterwards the learner copies new weights into the shared pages and
the worker reloads through its mapping, with no file written or read. This is the CPU path
(vLLM-CPU has no CUDA IPC / NCCL); it also works on GPUs as a fallback.

Loading (`load_weights`): after start-up vLLM-CPU repacks linear weights into kernel layouts
and drops the plain ones, so the model's own ``load_weights`` fails ("Attempted to load weight
into parameter torch.Size([0])"). vLLM's ``reload_weights`` (layer-wise, in place) restores the
checkpoint layout, loads, re-runs the post-load processing and copies the result back into the
original storage, so CUDA graphs and the KV cache stay valid; but on a small model it costs ~10x
the copy. On vLLM-CPU the first sync therefore gives the GEMM layers their plain weights back
(`keep_cpu_gemm_weights`) and every sync is then the model's ``load_weights`` (replayed as the
plain copies it made the first time: `CopyPlan`) and a repack of each GEMM kernel; elsewhere it is
``reload_weights``. Both need every weight: send the full state dict.

vLLM's worker already has ``update_weights`` / ``start_weight_update`` /
``finish_weight_update`` / ``init_weight_transfer_engine`` (its native weight-transfer
API), and it refuses an extension that reuses a name, so ours are prefixed ``apo_``.
This module is imported inside vLLM's worker processes; it must stay import-light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# safetensors dtype tag -> torch dtype name
_ST_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class MappedTensor:
    """One tensor of a mapped safetensors file: its bytes (a uint8 view of the shared mapping), dtype, shape."""

    __slots__ = ("name", "raw", "dtype", "shape", "_view")

    def __init__(self, name: str, raw: torch.Tensor, dtype: torch.dtype, shape: list[int]):
        self.name, self.raw, self.dtype, self.shape = name, raw, dtype, list(shape)
        aligned = raw.numel() > 0 and raw.storage_offset() % dtype.itemsize == 0
        self._view = raw.view(dtype).reshape(shape) if aligned else None  # view(dtype) needs alignment

    def read(self) -> torch.Tensor:
        """The tensor: a view of the mapping (a copy when its offset does not suit its dtype)."""
        import torch

        if self._view is not None:
            return self._view
        if self.raw.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return self.raw.clone().view(self.dtype).reshape(self.shape)

    def write(self, t: torch.Tensor) -> None:
        """Copy `t` (same dtype and shape, any device or layout) into the mapped bytes."""
        import torch

        if self._view is not None:
            self._view.copy_(t.detach())
        elif self.raw.numel():
            self.raw.copy_(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))


def map_safetensors(path: str) -> list[MappedTensor]:
    """The tensors of a safetensors file, in file order, over ONE shared mapping of it.

    Writes into the file's pages by another process (`weight_sync.ShmWeightSync`, which maps the same
    file) show through, and the mapping outlives the file's name (it can be unlinked once both
    sides hold it).
    """
    import json
    import os
    import struct

    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    buf = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
    base = 8 + n
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    return [
        MappedTensor(
            name,
            buf[base + m["data_offsets"][0] : base + m["data_offsets"][1]],
            getattr(torch, _ST_TORCH[m["dtype"]]),
            m["shape"],
        )
        for name, m in entries
    ]


# Per worker process: path -> (token, views) of the weight file a learner keeps rewriting in place.
_MAPPED: dict[str, tuple[str, list]] = {}


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from a safetensors file, in file (offset) order, memory-mapped."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
        for name in names:
            yield name, f.get_tensor(name)


# vLLM logs two lines on every in-place reload (timing at INFO, and a warning that the rotary
# embedding has no weights to load); at one reload per training step they drown the job log.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)


# The engine's prefix-cache reset after each reload logs "Successfully reset prefix cache" at INFO
# (its failures are warnings, kept). Set from here, it is quiet where the engine core shares the
# worker's process (vLLM-CPU's single process); with vLLM's multiprocess engine it still logs.
_RESET_LOGGER = "vllm.v1.core.block_pool"


_QUIETED = False


def _quiet_reload_logs() -> None:
    """Once per process: each `setLevel` clears every logger's level cache (~0.4 ms a call with
    vLLM's loggers, measured), which at one sync per step is a cost worth not paying again."""
    global _QUIETED
    if _QUIETED:
        return
    for name in _RELOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger(_RESET_LOGGER).setLevel(logging.WARNING)
    _QUIETED = True


class WeightSyncExtension:
    """Methods added to vLLM's worker class (``self`` is the worker: it has ``model_runner``)."""

    def apo_reload_from_file(self, path: str) -> dict:
        """Reload every weight found in the safetensors file at ``path`` (HF state-dict names).

        Returns:
            {"tensors": how many tensors were read, "seconds": wall time of the reload}.
        """
        _quiet_reload_logs()
        t0 = time.perf_counter()
        count = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in iter_safetensors(path):
                count += 1
                yield item

        load_weights(self, weights())
        return {"tensors": count, "seconds": time.perf_counter() - t0}

    def apo_reload_from_shm(self, path: str, token: str) -> dict:
        """Reload every weight of the learner's shared weight file (`weight_sync.ShmWeightSync`).

        The file is mapped once per `token` (a new token: the learner wrote a new file, e.g. other
        shapes) and read through the mapping at every reload; the learner writes the new weights
        into the same pages between reloads, never during one (its push waits for this call).
        """
        _quiet_reload_logs()
        t0 = time.perf_counter()
        cached = _MAPPED.get(path)
        if cached is None or cached[0] != token:
            _MAPPED.pop(path, None)  # the old mapping goes before the new one is made
            _MAPPED[path] = cached = (token, map_safetensors(path))
        load_weights(self, ((m.name, m.read()) for m in cached[1]))
        return {"tensors": len(cached[1]), "seconds": time.perf_counter() - t0}

    def apo_set_cpu_gemm(self, kind: str) -> None:
        """The kernel every linear layer gets after each later load (`repack_cpu_gemms`)."""
        from apo_ray.rollout.engine import CPU_GEMM_KERNELS

        if kind not in CPU_GEMM_KERNELS:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_KERNELS}; got {kind!r}")
        self._apo_cpu_gemm = kind

    def apo_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Load (name, tensor) pairs handed over in this process: an engine in its learner's process
        (`RolloutEngine.load_weights`) passes the learner's own tensors, with no copy in between.

        Returns:
            {"seconds": wall time of the load}.
        """
        _quiet_reload_logs()
        t0 = time.perf_counter()
        load_weights(self, weights)
        return {"seconds": time.perf_counter() - t0}


def load_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load a full HF state dict into the worker's model, in place.

    On vLLM-CPU (unquantized, no LoRA) the GEMM layers keep their plain weights (`keep_cpu_gemm_weights`,
    at the first load): the first load is the model's own ``load_weights`` into them, recorded; later
    ones replay its copies (`CopyPlan`); then each GEMM's kernel is rebuilt from its weight
    (`repack_cpu_gemms`). On the demo model: ~2.5 ms a load, against ~8.5 ms for ``reload_weights``
    (measured), whose layer-wise machinery restores each layer's checkpoint layout, loads,
    re-processes and copies back. Elsewhere (GPUs, quantized models, a layer whose weight cannot be
    rebuilt), ``reload_weights``.

    The CPU path holds every given tensor at once (to check it against the plan): views of the shared
    mapping or the learner's own tensors, no copy; a copy of each only when read from a file.

    Raises:
        RuntimeError: the CPU path was not given every weight of the model (named).
    """
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    model = worker.model_runner.get_model()
    kind = getattr(worker, "_apo_cpu_gemm", "onednn")  # `apo_set_cpu_gemm`
    gemms = getattr(model, "_apo_cpu_gemms", None)
    if gemms is None:
        cfg = worker.vllm_config
        plain = current_platform.is_cpu() and cfg.model_config.quantization is None and cfg.lora_config is None
        model._apo_cpu_gemms = gemms = keep_cpu_gemm_weights(model) if plain else False
    if gemms is False:
        if kind != "onednn" and not getattr(model, "_apo_warned_gemm", False):
            model._apo_warned_gemm = True
            log.warning("engine.cpu_gemm=%s is not used: this model reloads through vLLM's own kernels", kind)
        worker.reload_weights(weights_iterator=weights)  # model_runner.reload_weights in set_current_vllm_config()
        return
    named = list(weights)
    plan = getattr(model, "_apo_copy_plan", None)
    if plan and plan.matches(named):
        plan.apply(named)
        repack_cpu_gemms(gemms, kind)
        return
    with set_current_vllm_config(worker.vllm_config):
        if plan is None:  # the first load: learn what it does (None if it cannot be replayed)
            loaded, new = CopyPlan.record(model, named)
        else:  # no plan, or other names or layouts than its own: the model's loader (a plan is kept)
            loaded, new = model.load_weights(iter(named)), None
        names = getattr(model, "_apo_param_names", None)
        if names is None:
            model._apo_param_names = names = frozenset(name for name, _ in model.named_parameters())
        missing = sorted(names - set(loaded or ()))
        if missing:
            raise RuntimeError(f"weight sync sent no tensor for {len(missing)} of the model's weights: {missing[:5]}")
        if plan is None:
            model._apo_copy_plan = new if new is not None and new.verify(model, named) else False
        repack_cpu_gemms(gemms, kind)


class CopyPlan:
    """What the model's own ``load_weights`` does with a full state dict, to do again without it.

    vLLM's loader maps each HF name onto its fused layers (q/k/v into ``qkv_proj``, gate/up into
    ``gate_up_proj``), pads the vocabulary, and in the end copies each tensor into a slice of a
    parameter: in a small model the Python around those copies costs ~10x the copies (1.0 ms
    against ~0.1 on the demo model, measured). The first load runs the loader under a recorder that
    keeps each ``copy_`` (destination: a view of a parameter; source: a view of one of the given
    tensors) and ``fill_`` / ``zero_`` (e.g. the vocabulary's padding rows); later loads of the same
    names, dtypes, shapes and strides replay just those, in order.

    Nothing is assumed about the loader: a source that is not a view lying inside one given tensor,
    a destination outside the parameters, a fill with a value read from a tensor, or any other
    in-place write makes the plan void, and a plan is kept only once `verify` has shown, on the first
    load's own tensors, that replaying it writes every parameter bit for bit as the loader does.
    Otherwise every load stays the loader's. A parameter rebound to new storage afterwards (vLLM's
    post-load processing can do that) makes later loads the loader's again.
    """

    def __init__(self, layout: list[tuple[str, object, tuple, tuple]], steps: list[tuple], owners: list[tuple]):
        self.layout = layout  # (name, dtype, shape, stride) of each given tensor, in order
        self.steps = steps  # ("copy", dst, name, offset, size, stride) | ("fill", dst, value)
        self.owners = owners  # (parameter, its data_ptr) of every destination: the views must stay its own

    @classmethod
    def record(cls, model, named: list) -> tuple[object, CopyPlan | None]:
        """Run ``model.load_weights(named)`` under the recorder; returns (what it returned, the plan or None)."""
        import torch
        from torch.overrides import TorchFunctionMode

        ops: list[tuple] = []
        void = []

        class Recorder(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name == "copy_":
                    ops.append(("copy", args[0], args[1]))
                elif name in ("fill_", "zero_"):
                    ops.append(("fill", args[0], args[1] if name == "fill_" else 0))
                elif name == "__setitem__" or (
                    name.endswith("_") and not name.endswith("__") and name != "requires_grad_"
                ):  # another in-place write: not replayed, so no plan
                    void.append(name)
                return func(*args, **(kwargs or {}))

        with Recorder():
            loaded = model.load_weights(iter(named))
        if void:
            return loaded, None
        params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n, t) for n, t in named]
        steps: list[tuple] = []
        owners: dict[int, tuple] = {}
        for op in ops:
            dst = op[1]
            owner = params.get(dst.untyped_storage().data_ptr()) if isinstance(dst, torch.Tensor) else None
            if owner is None:
                return loaded, None
            owners[id(owner)] = (owner, owner.data_ptr())
            if op[0] == "fill":
                if not isinstance(op[2], (int, float, bool)):  # a value read from a tensor may change
                    return loaded, None
                steps.append(("fill", dst, op[2]))
                continue
            src = op[2]
            if not isinstance(src, torch.Tensor):
                return loaded, None
            if src.numel() == 0:
                continue
            start = src.data_ptr()
            end = start + (sum((n - 1) * st for n, st in zip(src.shape, src.stride())) + 1) * src.element_size()
            home = next((s for s in spans if s[0] <= start and end <= s[1] and s[3].dtype == src.dtype), None)
            if home is None or (start - home[0]) % src.element_size() or min(src.stride(), default=1) < 0:
                return loaded, None
            offset = (start - home[0]) // src.element_size()
            steps.append(("copy", dst, home[2], offset, tuple(src.shape), tuple(src.stride())))
        layout = [(n, t.dtype, tuple(t.shape), tuple(t.stride())) for n, t in named]
        return loaded, cls(layout, steps, list(owners.values()))

    def matches(self, named: list) -> bool:
        """Whether `named` has the recorded names, dtypes, shapes and strides, in order, on the CPU, and
        every parameter written still has the storage the plan writes into (nothing rebound it)."""
        if any(p.data_ptr() != ptr for p, ptr in self.owners):
            return False
        return len(named) == len(self.layout) and all(
            n == m[0]
            and t.dtype == m[1]
            and tuple(t.shape) == m[2]
            and tuple(t.stride()) == m[3]
            and t.device.type == "cpu"
            for (n, t), m in zip(named, self.layout)
        )

    def apply(self, named: list) -> None:
        """The recorded writes, from `named`'s tensors (which `matches`)."""
        src = dict(named)
        for step in self.steps:
            if step[0] == "copy":
                _, dst, name, offset, size, stride = step
                t = src[name]
                dst.copy_(t.as_strided(size, stride, t.storage_offset() + offset))
            else:
                step[1].fill_(step[2])

    def verify(self, model, named: list) -> bool:
        """Whether replaying the plan writes every parameter as the loader does, bit for bit: both
        start from parameters filled with NaN (so a value either one leaves unwritten shows), from the
        same tensors. The parameters end as the loader left them before (`named` loaded). Holds two
        copies of the parameters meanwhile, once per engine (the first load)."""
        import torch

        params = [p for p in model.parameters() if p.numel()]
        if any(not p.is_floating_point() for p in params):
            return False
        before = [p.detach().clone() for p in params]
        try:

            def load_from_nan(load) -> None:
                for p in params:
                    p.detach().fill_(float("nan"))
                load()

            load_from_nan(lambda: model.load_weights(iter(named)))
            by_loader = [p.detach().clone() for p in params]
            load_from_nan(lambda: self.apply(named))
            return all(_same_bits(a, p.detach()) for a, p in zip(by_loader, params))
        finally:
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.detach().copy_(b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals NaN of the same bits)."""
    import torch

    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
    )


def keep_cpu_gemm_weights(model: torch.nn.Module) -> list | bool:
    """Give back every vLLM-CPU GEMM layer of `model` its plain (checkpoint-layout) weight, to load into.

    After loading, vLLM-CPU packs each linear layer's weight into a kernel layout (oneDNN, or a
    vendor kernel) and drops the plain weight, so the model's ``load_weights`` has nowhere to write
    ("Attempted to load weight into parameter torch.Size([0])"). Each such layer gets a new weight
    built from the metadata vLLM records for its own reloads (shape, dtype and weight loader). The
    kernels keep their packed copies until `repack_cpu_gemms`; the caller loads every weight first
    (the new ones are uninitialised). Costs one more copy of the GEMM weights in memory.

    Returns:
        The GEMM layers (for `repack_cpu_gemms`); False, with the model untouched, when a weight
        cannot be rebuilt (no recorded metadata, or a removed weight outside a GEMM layer).
    """
    import torch

    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
    except ImportError:
        return False
    gemms = [mod for mod in model.modules() if hasattr(mod, "cpu_linear") and hasattr(mod, "weight")]
    removed = {}
    for mod in gemms:
        if mod.weight.numel() == 0:
            info = LAYERWISE_INFO.get(mod)
            meta = info.restore_metadata[0].get("weight") if info is not None else None
            if meta is None or meta.numel() == 0:
                return False
            removed[mod] = meta
    owned = {id(p) for mod in gemms for p in mod.parameters(recurse=False)}
    if any(p.numel() == 0 and id(p) not in owned for p in model.parameters()):
        return False
    for mod, meta in removed.items():
        with torch.device(mod.weight.device):
            weight = materialize_meta_tensor(meta)
        loader = getattr(weight, "weight_loader", None)
        while loader is not None and getattr(loader, "__name__", "") == "online_process_loader":
            loader = loader.__wrapped__  # vLLM's reload wrapper, left on the recorded metadata
        weight.weight_loader = loader
        mod.weight = restore_layer_refs(weight, mod)  # the recorded loaders are unbound from the layer
    return gemms


def repack_cpu_gemms(gemms: list, kind: str = "onednn") -> None:
    """Give each GEMM layer a kernel for its (new) plain weight, which it keeps.

    "onednn": rebuilt as vLLM-CPU builds it after loading: the same kernels, so the same samples and
    decode speed as after a reload. Each rebuild packs a copy of the weight, ~0.16 ms a layer even
    for the smallest (9 layers: ~2.6 of the demo model's 3.1 ms push, measured).
    "torch": torch's linear on the plain weight, which nothing needs to rebuild (the demo model's push
    3.1 -> 0.6 ms, its 64-prompt generate no slower, the same samples in a 64-prompt check). Per call
    it is up to ~30 % slower than oneDNN's for larger layers (2048 x 512 at 64 tokens, measured) and
    11 % slower to decode at 30M-100M parameters: it pays only for small layers and short responses.

    With "onednn", an input embedding's kernel is rebuilt only when first used. vLLM-CPU builds one
    for every vocabulary embedding, in case the model computes its logits with it, but most models
    look tokens up in it and have a separate LM head (sharing the weight when tied), so its kernel is
    never run: 0.16 of the demo model's 2.24 ms load (measured), and the largest matrix of a tied
    model. One that is used (a model that calls its embedding as the LM head) gets the same kernel
    at its first call.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    for mod in gemms:
        if kind == "torch":
            mod.cpu_linear = torch_linear
        elif isinstance(mod, VocabParallelEmbedding) and not isinstance(mod, ParallelLMHead):
            mod.cpu_linear = _repack_at_first_call(mod, dispatch_cpu_unquantized_gemm)
        else:
            dispatch_cpu_unquantized_gemm(mod, remove_weight=False)


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`engine.cpu_gemm=torch`'s kernel, called as vLLM calls a layer's ``cpu_linear``.

    The bias is cast to the input's dtype: vLLM-CPU's small-GEMM kernel (bf16/fp16 weights on AMX CPUs)
    turned it to float32 at load, in place, and later loads copy into that float32 tensor.
    """
    import torch.nn.functional as F

    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _repack_at_first_call(mod: torch.nn.Module, dispatch: Callable) -> Callable:
    """A stand-in for `mod`'s GEMM kernel: builds it from `mod`'s current weight, then runs it."""

    def cpu_linear(x, weight, bias):
        dispatch(mod, remove_weight=False)  # sets mod.cpu_linear to the new kernel
        return mod.cpu_linear(x, weight, bias)

    return cpu_linear
