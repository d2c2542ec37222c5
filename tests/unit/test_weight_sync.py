"""The pure parts of weight sync: the streaming safetensors writer, bucketing, engine calls, shm push.

No vLLM here (tests/integration/test_rollout.py pushes into a real engine); the "engine" below
is a plain object with the one method the shm backend calls.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from apo_ray.rollout.engine import _sync_backend
from apo_ray.rollout.weight_sync import (
    ShmWeightSync,
    _call,
    _call_async,
    _wait,
    iter_buckets,
    make_weight_sync,
    to_wire,
    write_weights_shm,
)
from apo_ray.rollout.worker_ext import from_wire, iter_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g)
    return {
        "a.f32": w,
        "a.t": w.t(),  # non-contiguous, shares storage with a.f32 (like tied weights)
        "b.bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.i64": torch.arange(6).view(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def test_write_weights_roundtrip(tmp_path):
    src = _tensors()
    path = write_weights_shm(src.items(), tmp_path / "w.safetensors")
    assert path == str(tmp_path / "w.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp files left behind
    back = load_file(path)
    assert back.keys() == src.keys()
    for k, v in src.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v), k
    # the worker reads in file order, i.e. the order the learner yielded (layer by layer)
    assert [k for k, _ in iter_safetensors(path)] == list(src)


def test_write_weights_overwrites_atomically_and_rejects_duplicates(tmp_path):
    path = tmp_path / "w.safetensors"
    write_weights_shm([("x", torch.ones(2))], path)
    write_weights_shm([("x", torch.full((3,), 7.0))], path)
    assert torch.equal(load_file(path)["x"], torch.full((3,), 7.0))
    with pytest.raises(ValueError, match="duplicate"):
        write_weights_shm([("x", torch.ones(1)), ("x", torch.ones(1))], path)
    assert torch.equal(load_file(path)["x"], torch.full((3,), 7.0))  # a failed write leaves the old file
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_iter_buckets():
    # float32: 4 bytes per element; bucket 40 bytes = 10 elements
    named = [(n, torch.zeros(k)) for n, k in [("a", 4), ("b", 4), ("c", 2), ("d", 1), ("e", 30), ("f", 3)]]
    got = [[n for n, _ in b] for b in iter_buckets(named, 40)]
    # a+b = 32 B, +c = 40 B (fits exactly), d starts a new one, e (120 B) goes alone, then f
    assert got == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    assert list(iter_buckets([], 40)) == []


class _Recorder:
    """Stands in for RolloutEngine: loads the file the way the worker extension does."""

    def __init__(self):
        self.loaded: list[dict[str, torch.Tensor]] = []

    def update_weights_from_file(self, path: str) -> None:
        self.loaded.append(dict(iter_safetensors(path)))


def test_call_plain_object():
    """`_call` runs a plain object's method (and `.remote` + ray.get for an actor handle)."""
    assert _call([1, 2, 3], "index", 2) == 1
    assert _wait(_call_async([1, 2, 3], "count", 3)) == 1


def test_shm_push(tmp_path):
    src = _tensors()
    sync = ShmWeightSync(rank=3, run_id="unit", directory=str(tmp_path))
    rec = _Recorder()
    stats = sync.push(iter(src.items()), rec)
    assert stats.tensors == len(src)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in src.values())
    assert sync.path.name == "apo-ray-unit-rank3.safetensors"
    assert os.listdir(tmp_path) == []  # removed after the engine loaded it
    assert all(torch.equal(rec.loaded[0][k], v) for k, v in src.items())


def test_wire_roundtrip_every_dtype_and_layout():
    """to_wire -> (pickle, as Ray carries it) -> from_wire gives back every tensor bit for bit."""
    import pickle

    src = _tensors()
    wire = pickle.loads(pickle.dumps([to_wire(n, t) for n, t in src.items()], protocol=5))
    back = dict(from_wire(item) for item in wire)
    assert list(back) == list(src)
    for k, v in src.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_from_wire_reads_a_read_only_array_without_warning():
    import warnings

    name, dtype, shape, data = to_wire("w", torch.arange(6.0).view(2, 3))
    data = data.copy()
    data.setflags(write=False)  # what Ray hands out of its object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(from_wire((name, dtype, shape, data))[1], torch.arange(6.0).view(2, 3))


class _InProcessEngine(_Recorder):
    """An engine whose worker is in its process: it takes the weights in the call."""

    def takes_tensors(self) -> bool:
        return True

    def update_weights_from_wire(self, items: list) -> None:
        self.loaded.append(dict(from_wire(item) for item in items))


def test_shm_push_hands_tensors_to_an_in_process_engine_without_a_file(tmp_path):
    src = _tensors()
    eng = _InProcessEngine()
    stats = ShmWeightSync(rank=0, run_id="unit", directory=str(tmp_path)).push(iter(src.items()), eng)
    assert stats.tensors == len(src) and os.listdir(tmp_path) == []
    assert all(torch.equal(eng.loaded[0][k], v) for k, v in src.items())
    # forced through the file, the same engine reads the same weights from it
    eng2 = _InProcessEngine()
    ShmWeightSync(rank=0, directory=str(tmp_path), direct=False).push(iter(src.items()), eng2)
    assert all(torch.equal(eng2.loaded[0][k], v) for k, v in src.items()) and os.listdir(tmp_path) == []


def test_shm_push_empty_stream_raises_after_exhausting_it(tmp_path):
    gathers = []

    def rank1_named_weights():  # a ZeRO-3 rank that gathers every module but yields nothing
        for i in range(3):
            gathers.append(i)
        yield from ()

    rec = _Recorder()
    with pytest.raises(RuntimeError, match="rank 1: the learner yielded no tensors"):
        ShmWeightSync(rank=1, directory=str(tmp_path)).push(rank1_named_weights(), rec)
    assert gathers == [0, 1, 2] and rec.loaded == []


def test_backend_names():
    assert isinstance(make_weight_sync("shm", rank=0, run_id="x"), ShmWeightSync)
    with pytest.raises(ValueError, match="unknown weight sync backend"):
        make_weight_sync("tcp")
    assert _sync_backend(True, on_cpu=True) == "shm"
    assert _sync_backend(True, on_cpu=False) == "ipc"
    assert _sync_backend(False, on_cpu=True) is None
    assert _sync_backend("nccl", on_cpu=False) == "nccl"
    with pytest.raises(ValueError, match="needs GPUs"):
        _sync_backend("ipc", on_cpu=True)
    with pytest.raises(ValueError):
        _sync_backend("gloo", on_cpu=False)
