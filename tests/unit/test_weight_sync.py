"""The pure parts of weight sync: the streaming safetensors writer, bucketing, engine calls, shm push.

No vLLM here (tests/integration/test_rollout.py pushes into a real engine); the "engine" below
is a plain object with the one method the shm backend calls.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from apo_ray.rollout.engine import _sync_backend, prefix_cache_in_use
from apo_ray.rollout.weight_sync import (
    ShmWeightSync,
    _call_async,
    _wait,
    call_engine,
    copy_into_views,
    iter_buckets,
    make_weight_sync,
    write_weights_shm,
)
from apo_ray.rollout.worker_ext import iter_safetensors, map_safetensors


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
    """`call_engine` runs a plain object's method (and `.remote` + ray.get for an actor handle)."""
    assert call_engine([1, 2, 3], "index", 2) == 1
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


class _MappingEngine(_Recorder):
    """An engine that reloads through its mapping of the learner's file, as the worker extension does."""

    def __init__(self):
        super().__init__()
        self.maps = 0
        self._cache: tuple[str, list] | None = None

    def update_weights_from_shm(self, path: str, token: str) -> None:
        if self._cache is None or self._cache[0] != token:
            self._cache = (token, map_safetensors(path))
            self.maps += 1
        self.loaded.append({m.name: m.read().clone() for m in self._cache[1]})


def _equal(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())


def test_shm_push_map_mode_writes_once_then_copies_in_place(tmp_path):
    src = _tensors()
    eng = _MappingEngine()
    sync = ShmWeightSync(rank=0, run_id="unit", directory=str(tmp_path))
    sync.push(iter(src.items()), eng)
    assert _equal(eng.loaded[-1], src) and eng.maps == 1
    assert os.listdir(tmp_path) == []  # both sides hold the mapping: the name is gone
    for step in range(3):  # new values, same layout: copied into the shared pages, no new file
        new = {k: (v * (step + 2) if v.is_floating_point() else v + step) for k, v in src.items()}
        new["e.bool"] = src["e.bool"]
        sync.push(iter(new.items()), eng)
        assert _equal(eng.loaded[-1], new) and eng.maps == 1 and os.listdir(tmp_path) == []
    other = dict(src, **{"a.f32": torch.ones(4, 5)})  # a shape changes: a new file, mapped anew
    sync.push(iter(other.items()), eng)
    assert _equal(eng.loaded[-1], other) and eng.maps == 2
    fewer = {k: v for k, v in other.items() if k != "g.empty"}  # a tensor less: a new file too
    sync.push(iter(fewer.items()), eng)
    assert _equal(eng.loaded[-1], fewer) and eng.maps == 3
    second = _MappingEngine()  # another engine has not mapped the file: it is written for it
    sync.push(iter(fewer.items()), second)
    assert _equal(second.loaded[-1], fewer)
    sync.close()
    assert os.listdir(tmp_path) == []


def test_shm_push_map_mode_falls_back_to_a_file_for_an_engine_without_it(tmp_path):
    rec = _Recorder()
    ShmWeightSync(rank=0, directory=str(tmp_path)).push(iter(_tensors().items()), rec)
    assert _equal(rec.loaded[0], _tensors()) and os.listdir(tmp_path) == []


def test_copy_into_views(tmp_path):
    path = write_weights_shm([("a", torch.zeros(2)), ("b", torch.zeros(3))], tmp_path / "w.safetensors")
    views = map_safetensors(path)
    assert copy_into_views(iter([("a", torch.ones(2)), ("b", torch.full((3,), 2.0))]), views) is None
    again = {m.name: m.read() for m in map_safetensors(path)}  # another mapping of the file sees the writes
    assert torch.equal(again["a"], torch.ones(2)) and torch.equal(again["b"], torch.full((3,), 2.0))
    rest = copy_into_views(iter([("a", torch.full((2,), 5.0)), ("c", torch.ones(1)), ("d", torch.ones(1))]), views)
    assert [n for n, _ in rest] == ["a", "c", "d"] and torch.equal(views[0].read(), torch.full((2,), 5.0))
    assert [n for n, _ in copy_into_views(iter([("a", torch.ones(2))]), views)] == ["a"]  # too few
    assert [n for n, _ in copy_into_views(iter([("a", torch.ones(2, dtype=torch.float64))]), views)] == ["a"]


def test_mapped_tensors_at_unaligned_offsets_are_written_and_read_through_the_bytes(tmp_path):
    src = _tensors()  # bf16 / f16 / bool tensors put the int64 and float32 ones after them off their alignment
    path = write_weights_shm(src.items(), tmp_path / "w.safetensors")
    learner, engine = map_safetensors(path), map_safetensors(path)
    assert any(m._view is None and m.raw.numel() for m in learner)  # the case this test is about
    new = {k: (v + 1 if v.dtype != torch.bool else ~v) for k, v in src.items()}
    assert copy_into_views(iter(new.items()), learner) is None
    assert _equal({m.name: m.read() for m in engine}, new)


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


def test_a_weight_sync_resets_the_prefix_cache_only_where_a_block_can_fill():
    assert prefix_cache_in_use(True, 256, 128) and prefix_cache_in_use(True, 128, 128)
    assert not prefix_cache_in_use(True, 40, 128)  # the demo: 32 + 8 tokens never fill a CPU block
    assert not prefix_cache_in_use(False, 4096, 16)


class _Fused(torch.nn.Module):
    """A toy of vLLM's loading: q and k into one fused weight, a padded vocabulary, a norm.

    `how` picks the loader's way of writing the norm: "copy" and "sliced" (from a view at an offset
    into a wider given tensor: replayable), "filled_from_tensor" (a value read from a tensor: may
    change from load to load, not replayable), "scaled" (an in-place
    multiply: not replayable), "converted" (copies a converted temporary: no source in the given
    tensors), "assigned" (rebinds ``.data``: the recorder sees no write at all).
    """

    def __init__(self, how: str = "copy"):
        super().__init__()
        self.qk = torch.nn.Parameter(torch.zeros(6, 4), requires_grad=False)
        self.emb = torch.nn.Parameter(torch.zeros(8, 4), requires_grad=False)  # 5 rows + 3 padding
        self.norm = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        self.how = how

    def load_weights(self, weights):
        loaded = set()
        for name, w in weights:
            if name in ("q", "k"):
                self.qk.data.narrow(0, 0 if name == "q" else 4, w.shape[0]).copy_(w)
                loaded.add("qk")
            elif name == "emb":
                self.emb[: w.shape[0]].data.copy_(w)
                self.emb[w.shape[0] :].data.fill_(0)
                loaded.add("emb")
            elif self.how == "copy":
                self.norm.data.copy_(w)
            elif self.how == "sliced":  # the norm is the middle of a wider tensor, read transposed
                self.norm.data.copy_(w.t()[1, 2:6])
            elif self.how == "filled_from_tensor":
                self.norm.data.fill_(w[0])
            elif self.how == "scaled":
                self.norm.data.copy_(w)
                self.norm.data.mul_(2.0)
            elif self.how == "converted":
                self.norm.data.copy_(w.to(torch.float64))
            else:
                self.norm.data = w.clone()
            loaded.add("norm")
        return loaded


def _state(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [("q", torch.randn(4, 4, generator=g)), ("k", torch.randn(2, 4, generator=g)),
            ("emb", torch.randn(5, 4, generator=g)), ("norm", torch.randn(4, generator=g))]  # fmt: skip


def test_copy_plan_replays_the_loaders_writes_bit_for_bit():
    """The recorded copies (from views of the given tensors, into slices of parameters) and fills,
    replayed from other tensors of the same layout, leave what the loader itself would."""
    from apo_ray.rollout.worker_ext import CopyPlan

    model, ref = _Fused(), _Fused()
    first = _state(0)
    loaded, plan = CopyPlan.record(model, first)
    assert loaded == {"qk", "emb", "norm"} and plan is not None
    assert [s[0] for s in plan.steps] == ["copy", "copy", "copy", "fill", "copy"]
    assert plan.verify(model, first)
    ref.load_weights(iter(first))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))  # verify restores

    model.emb.data[5:] = 7.0  # the padding rows: the plan's fill rewrites them
    second = _state(1)
    assert plan.matches(second)
    plan.apply(second)
    ref.load_weights(iter(second))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))

    # a source that is a row of a bigger tensor (a view with an offset): same layout, replayed
    big = torch.randn(3, 4)
    views = [*_state(2)[:3], ("norm", big[1])]
    assert plan.matches(views)
    plan.apply(views)
    assert torch.equal(model.norm, big[1])
    # another layout, dtype or name set: not this plan's
    assert not plan.matches(_state(3)[:3])
    assert not plan.matches([*_state(3)[:3], ("norm", torch.randn(4, dtype=torch.float64))])
    assert not plan.matches([*_state(3)[:3], ("other", torch.randn(4))])
    assert not plan.matches([*_state(3)[:3], ("norm", torch.randn(8)[::2])])


def test_copy_plan_replays_a_source_at_an_offset_and_refuses_rebound_parameters():
    """A source inside a wider given tensor (transposed, at a non-zero offset) is replayed from the
    same place of the next tensor; a parameter rebound to new storage after the plan was made (as
    vLLM's post-load processing can do) sends later loads back to the loader."""
    from apo_ray.rollout.worker_ext import CopyPlan

    model, ref = _Fused("sliced"), _Fused("sliced")

    def state(seed: int) -> list:
        return [*_state(seed)[:3], ("norm", torch.randn(8, 2, generator=torch.Generator().manual_seed(seed)))]

    first = state(0)
    _, plan = CopyPlan.record(model, first)
    assert plan is not None and plan.verify(model, first)
    assert [s[3] for s in plan.steps if s[0] == "copy" and s[2] == "norm"] == [1 + 2 * 2]  # row 1, columns 2..5
    second = state(1)
    plan.apply(second)
    ref.load_weights(iter(second))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert plan.matches(second)
    model.norm.data = torch.zeros(4)
    assert not plan.matches(second)


@pytest.mark.parametrize("how", ["scaled", "converted", "filled_from_tensor"])
def test_copy_plan_is_void_for_writes_it_cannot_replay(how):
    from apo_ray.rollout.worker_ext import CopyPlan

    loaded, plan = CopyPlan.record(_Fused(how), _state(0))
    assert loaded == {"qk", "emb", "norm"} and plan is None


def test_copy_plan_that_misses_a_write_fails_verification():
    """A loader that rebinds a parameter's data writes nothing the recorder sees; the replay then
    leaves that parameter unwritten, which `verify` catches (NaN against the loaded values)."""
    from apo_ray.rollout.worker_ext import CopyPlan

    model = _Fused("assigned")
    first = _state(0)
    _, plan = CopyPlan.record(model, first)
    assert plan is not None and not plan.verify(model, first)
    assert torch.equal(model.norm, first[3][1])  # left as the loader left it
