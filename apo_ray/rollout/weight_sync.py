"""Weight sync: push the learner's weights into its rollout engine after every optimizer step.

One interface, four backends, chosen by ``make_weight_sync(backend, ...)``:

- "local" (CPU; tested): the engine lives in the learner's own process (`train.rollout_process`),
  so the learner's tensors go straight into vLLM's ``load_weights`` (`RolloutEngine.load_weights`):
  no copy, no file, no round trip.

- "shm" (CPU; tested): through shared memory on the node. The first push streams (name, tensor)
  pairs into a safetensors file in /dev/shm (`write_weights_shm`) that the learner and the engine's
  worker both map (`worker_ext.map_safetensors`); every later push copies the weights into the
  mapped pages in place and the engine reloads through its mapping
  (`RolloutEngine.update_weights_from_shm` -> `worker_ext.WeightSyncExtension`): no file is written
  and nothing is serialised. The file's name is removed once the engine holds the mapping. Engine
  and learner must share a node (the Stage 2 loop pins the engine to its learner's node).
- "ipc" (colocated GPUs) and "nccl" (engine on other GPUs): vLLM's native weight-transfer API
  (``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
  ``finish_weight_update``), with tensors packed into buckets of ``bucket_bytes`` (512 MiB by
  default) so a 7B model is ~30 RPCs, not ~340. Written from the vLLM 0.32 sources
  (vllm/distributed/weight_transfer/{ipc_engine,nccl_engine,packed_tensor}.py) and NOT tested:
  this project's CI has no GPU vLLM. The engine must be built with ``weight_sync=<backend>``.

Usage (every learner rank, each with its own engine)::

    sync = make_weight_sync("shm", rank=rank, run_id="run1")
    stats = sync.push(learner.named_weights(), engine)   # engine: RolloutEngine or its Ray actor handle

``push`` must receive the FULL HF state dict on every rank that owns an engine: vLLM's
in-place reload rebuilds each layer from the weights it is given. A rank whose iterator is
empty raises (after exhausting it, so ZeRO-3 gathers stay in lockstep).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

DEFAULT_BUCKET_BYTES = 512 * 1024**2

# torch dtype -> safetensors dtype tag
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class PushStats:
    tensors: int
    bytes: int
    seconds: float


class WeightSync(Protocol):
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], engine: Any) -> PushStats: ...

    def close(self) -> None: ...


def make_weight_sync(
    backend: str,
    *,
    rank: int = 0,
    run_id: str | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    engine_world_size: int = 1,
) -> WeightSync:
    """Build the learner-side syncer for one engine.

    Args:
        backend: "shm" | "local" | "ipc" | "nccl" (must match the engine's ``weight_sync``).
        rank: learner rank (names the shm file; error messages).
        run_id: names the shm file, so concurrent runs and ranks do not collide.
        bucket_bytes: bucket size for the GPU backends.
        engine_world_size: "nccl" only: the engine's worker count (tensor_parallel_size).
    """
    if backend == "shm":
        return ShmWeightSync(rank=rank, run_id=run_id)
    if backend == "local":
        return LocalWeightSync(rank=rank)
    if backend == "ipc":
        return IpcWeightSync(rank=rank, bucket_bytes=bucket_bytes)
    if backend == "nccl":
        return NcclWeightSync(rank=rank, bucket_bytes=bucket_bytes, engine_world_size=engine_world_size)
    raise ValueError(f"unknown weight sync backend {backend!r} (shm | local | ipc | nccl)")


# ---------------------------------------------------------------- engine calls


def call_engine(handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``method`` on a RolloutEngine or on its Ray actor handle, and wait for the result."""
    fn = getattr(handle, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


def _call_async(handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Start a call; returns something `_wait` accepts (an ObjectRef, or a thread future)."""
    fn = getattr(handle, method)
    if hasattr(fn, "remote"):
        return fn.remote(*args, **kwargs)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return fut


def _wait(pending: Any) -> Any:
    if hasattr(pending, "result"):
        return pending.result()
    import ray

    return ray.get(pending)


# ---------------------------------------------------------------- local (CPU, one process)


class LocalWeightSync:
    """CPU backend for an engine in the learner's own process (a `RolloutEngine`, not an actor
    handle): its worker loads the learner's tensors as they are (`RolloutEngine.load_weights`)."""

    def __init__(self, *, rank: int = 0):
        self.rank = rank

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], engine: Any) -> PushStats:
        if not hasattr(engine, "load_weights"):
            raise TypeError(f"the 'local' weight sync needs the RolloutEngine itself, in this process; got {engine!r}")
        t0 = time.perf_counter()
        counted = _Counted(_nonempty(named_tensors, self.rank))
        engine.load_weights(counted)
        return PushStats(tensors=counted.tensors, bytes=counted.bytes, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- shm (CPU)


def default_shm_dir() -> str:
    """/dev/shm when writable (RAM-backed), else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def write_weights_shm(named_tensors: Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike | None = None) -> str:
    """Stream (name, tensor) pairs into a safetensors file, atomically; returns its path.

    Holds one tensor at a time in memory (ZeRO-3 gathers can stream in): the data goes to a
    side file as it arrives (the header, which comes first in the format, needs every shape),
    then header + data are copied to a temp file that is renamed into place, so a reader never
    sees a partial file; for that moment the weights take twice their size in /dev/shm.
    Tensors may be on any device, non-contiguous, or share storage (tied weights).

    Args:
        named_tensors: HF state-dict names and tensors; names must be unique.
        path: target file; default ``<default_shm_dir()>/apo-ray-weights-<pid>.safetensors``.
    """
    path = Path(path) if path is not None else Path(default_shm_dir()) / f"apo-ray-weights-{os.getpid()}.safetensors"
    body = path.with_name(f".{path.name}.{os.getpid()}.body")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header: dict[str, Any] = {}
    offset = 0
    try:
        with open(body, "wb") as f:
            for name, tensor in named_tensors:
                if name in header:
                    raise ValueError(f"duplicate tensor name {name!r}")
                t = tensor.detach().to("cpu").contiguous()
                if t.dtype not in _ST_DTYPES:
                    raise TypeError(f"{name}: dtype {t.dtype} has no safetensors encoding")
                data = t.reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                header[name] = {
                    "dtype": _ST_DTYPES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + data.nbytes],
                }
                offset += data.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors pads the header to 8-byte alignment
        with open(tmp, "wb") as out, open(body, "rb") as src:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            while chunk := src.read(64 * 1024**2):
                out.write(chunk)
        os.replace(tmp, path)
    finally:
        for p in (body, tmp):
            p.unlink(missing_ok=True)
    return str(path)


class ShmWeightSync:
    """CPU backend: the weights through shared memory on the node; the engine's worker extension reloads them.

    Modes:
        "map" (default): a safetensors file in /dev/shm that both sides map once; every later push
            copies the weights into the mapped pages in place (no file written, nothing serialised)
            and tells the engine to reload through its mapping. Once the engine has mapped the file
            its name is removed, so nothing outlives the two processes; a push whose names, dtypes or
            shapes differ from the mapped ones (or to an engine that has not mapped it) writes a new one.
        "file": a new safetensors file per push, deleted after the reload.
    An engine without the "map" method (`update_weights_from_shm`) gets "file".

    Args:
        rank, run_id: name the file (so concurrent runs and ranks do not collide).
        directory: of the file; default `default_shm_dir()`.
        mode: "map" | "file".
    """

    def __init__(self, *, rank: int = 0, run_id: str | None = None, directory: str | None = None, mode: str = "map"):
        if mode not in ("map", "file"):
            raise ValueError(f"mode must be map or file, got {mode!r}")
        run_id = run_id or str(os.getpid())
        self.rank, self.mode = rank, mode
        self.path = Path(directory or default_shm_dir()) / f"apo-ray-{run_id}-rank{rank}.safetensors"
        self._views: list | None = None  # worker_ext.MappedTensor of the mapped file, in file order
        self._token = ""
        self._engines: set[int] = set()  # id() of the engines that mapped the current file

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], engine: Any) -> PushStats:
        t0 = time.perf_counter()
        counted = _Counted(_nonempty(named_tensors, self.rank))
        mode = self.mode if self.mode == "file" or hasattr(engine, "update_weights_from_shm") else "file"
        if mode == "map":
            self._push_mapped(counted, engine)
        else:
            path = write_weights_shm(counted, self.path)
            try:
                call_engine(engine, "update_weights_from_file", path)
            finally:
                Path(path).unlink(missing_ok=True)
        return PushStats(tensors=counted.tensors, bytes=counted.bytes, seconds=time.perf_counter() - t0)

    def _push_mapped(self, named: Iterable[tuple[str, torch.Tensor]], engine: Any) -> None:
        rest = copy_into_views(named, self._views) if self._views is not None else named
        if rest is not None or id(engine) not in self._engines:
            self._remap(rest if rest is not None else [(m.name, m.read()) for m in self._views or []])
        try:
            call_engine(engine, "update_weights_from_shm", str(self.path), self._token)
            self._engines.add(id(engine))
        finally:  # mapped by the engine (or it failed: the next push writes a new file): the name goes
            self.path.unlink(missing_ok=True)

    def _remap(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        from apo_ray.rollout.worker_ext import map_safetensors

        write_weights_shm(named, self.path)
        self._views = map_safetensors(str(self.path))
        self._token = uuid.uuid4().hex
        self._engines = set()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self._views, self._engines = None, set()


def copy_into_views(named_tensors: Iterable[tuple[str, torch.Tensor]], views: list) -> Iterable | None:
    """Copy each (name, tensor) into the mapped tensor (`worker_ext.MappedTensor`) of the same name,
    dtype and shape at the same position.

    Returns None when the stream matched `views` exactly (every one now holds the new values);
    otherwise the whole stream to write afresh: the tensors already copied, then the first that did
    not match, then the rest of the stream, unread (a ZeRO-3 gather streams; nothing is held).
    """
    it = iter(named_tensors)
    i = 0
    for name, t in it:
        m = views[i] if i < len(views) else None
        if m is None or m.name != name or m.dtype != t.dtype or m.shape != list(t.shape):
            return itertools.chain(((v.name, v.read()) for v in views[:i]), [(name, t)], it)
        m.write(t)
        i += 1
    return None if i == len(views) else [(v.name, v.read()) for v in views[:i]]


class _Counted:
    """Wraps a (name, tensor) iterable and counts what went through."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        self._it, self.tensors, self.bytes = iter(named_tensors), 0, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._it:
            self.tensors += 1
            self.bytes += t.numel() * t.element_size()
            yield name, t


def _nonempty(named_tensors: Iterable[tuple[str, torch.Tensor]], rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The same stream, or an error before anything reaches the engine if it is empty.

    An empty stream is exhausted here, so ZeRO-3 ranks still run all their gathers first.
    """
    it = iter(named_tensors)
    first = next(it, None)
    if first is None:
        raise RuntimeError(
            f"weight sync on rank {rank}: the learner yielded no tensors. Every rank that owns a rollout "
            "engine must yield the full state dict (under ZeRO-3 each rank holds the gathered parameters "
            "inside GatheredParameters, so it can)."
        )
    return itertools.chain([first], it)


# ---------------------------------------------------------------- GPU backends (untested here)


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def _meta(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    return {
        "names": [n for n, _ in bucket],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


class IpcWeightSync:
    """Colocated GPUs: CUDA IPC through vLLM's "ipc" weight-transfer engine, packed buckets.

    Each bucket is copied into one CUDA buffer (grown when a single tensor is larger than
    ``bucket_bytes``, e.g. a 7B model's 1.1 GB embedding) whose IPC handle goes to the engine
    with the bucket's names/dtypes/shapes/sizes; vLLM's consumer clones out of it and loads
    through its layerwise reload. The buffer is exported once per push (vLLM's importer
    pairs one export with one release, see ``PackedBufferImporter``). Handles travel pickled
    (``ipc_handles_pickled``); the engine process needs VLLM_ALLOW_INSECURE_SERIALIZATION=1,
    which ``RolloutEngine(weight_sync="ipc")`` sets. Engine TP must be 1 (one GPU, the learner's).
    Not tested: written from vllm/distributed/weight_transfer/ipc_engine.py (vLLM 0.32).
    """

    def __init__(self, *, rank: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.rank, self.bucket_bytes = rank, bucket_bytes
        self._initialized: set[int] = set()

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], engine: Any) -> PushStats:
        import base64
        import pickle

        from torch.multiprocessing.reductions import reduce_tensor

        t0 = time.perf_counter()
        if id(engine) not in self._initialized:
            call_engine(engine, "init_weight_transfer_engine", {"packed": True})
            self._initialized.add(id(engine))
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        named = _nonempty(named_tensors, self.rank)
        buf, handle, count, total = None, None, 0, 0
        call_engine(engine, "start_weight_update")
        for bucket in iter_buckets(named, self.bucket_bytes):
            sizes = [t.numel() * t.element_size() for _, t in bucket]
            if buf is None or buf.numel() < sum(sizes):
                buf = torch.empty(max(sum(sizes), self.bucket_bytes), dtype=torch.uint8, device="cuda")
                handle = reduce_tensor(buf)[1]
            off = 0
            for (_, t), n in zip(bucket, sizes):
                buf[off : off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
                off += n
            torch.cuda.current_stream().synchronize()
            handles = base64.b64encode(pickle.dumps({uuid: handle})).decode()  # a str survives vLLM's msgpack RPC
            call_engine(
                engine, "update_weights", {**_meta(bucket), "ipc_handles_pickled": handles, "tensor_sizes": sizes}
            )
            count, total = count + len(bucket), total + off
        call_engine(engine, "finish_weight_update")
        del buf
        torch.cuda.ipc_collect()
        return PushStats(tensors=count, bytes=total, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        pass


class NcclWeightSync:
    """Engine on other GPUs: NCCL broadcast through vLLM's "nccl" weight-transfer engine.

    First push: a rendezvous (this process is rank 0 of a fresh group of 1 + the engine's
    TP workers). Each push: ``start_weight_update``; per bucket, ``update_weights(metadata)``
    runs on the engine while this process broadcasts the bucket with vLLM's packed producer
    (both sides split a bucket the same way: same metadata, same ``bucket_bytes``);
    ``finish_weight_update``. Not tested: written from nccl_engine.py / nccl_common.py (vLLM 0.32).
    """

    def __init__(self, *, rank: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES, engine_world_size: int = 1):
        self.rank, self.bucket_bytes = rank, bucket_bytes
        self.engine_world_size = engine_world_size
        self.group = None

    def _init(self, engine: Any) -> None:
        """Rendezvous on a port this process already listens on: picking a free port, releasing it
        and binding it again in the store could lose it to another process in between."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.nccl import unpinned_nccl_env

        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - no Ray: single host
            host = "127.0.0.1"
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind((host, 0))
        listen.listen()
        port = listen.getsockname()[1]
        world = 1 + self.engine_world_size
        info = {
            "master_address": host,
            "master_port": port,
            "rank_offset": 1,
            "world_size": world,
            "packed": True,
            "packed_buffer_size_bytes": self.bucket_bytes,
            "packed_num_buffers": 2,
        }
        pending = _call_async(engine, "init_weight_transfer_engine", info)  # blocks in the rendezvous
        # vLLM's trainer_init, with our listening socket handed to the store (rank 0 serves it).
        pg = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world, listen_socket=listen)
        with unpinned_nccl_env():
            self.group = PyNcclCommunicator(pg, device=torch.cuda.current_device())
        _wait(pending)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], engine: Any) -> PushStats:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        t0 = time.perf_counter()
        named = _nonempty(named_tensors, self.rank)
        if self.group is None:
            self._init(engine)
        count, total = 0, 0
        call_engine(engine, "start_weight_update")
        for bucket in iter_buckets(named, self.bucket_bytes):
            pending = _call_async(engine, "update_weights", _meta(bucket))
            packed_nccl_broadcast_producer(
                iterator=iter(bucket),
                group=self.group,
                src=0,
                post_iter_func=lambda item: item[1].detach().to("cuda"),
                buffer_size_bytes=self.bucket_bytes,
                num_buffers=2,
            )
            _wait(pending)
            count += len(bucket)
            total += sum(t.numel() * t.element_size() for _, t in bucket)
        call_engine(engine, "finish_weight_update")
        return PushStats(tensors=count, bytes=total, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
