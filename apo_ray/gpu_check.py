"""The GPU check: Stage 2's learner side on one bare GPU box, in one table.

    python jobs/gpu_check.py                 # CUDA: Qwen2.5-0.5B- and 1.5B-shaped random models, bf16
    python jobs/gpu_check.py --device cpu    # reduced: tiny shapes on the CPU (gloo), as the tests run it

Needs only torch, transformers, deepspeed and apo_ray's pure-Python dependencies: no Ray, no vLLM,
no network (the models are built from a config with random weights). What it measures:

- the real `Learner` with ZeRO-2 and ZeRO-3: A*-PO vs GRPO (G=8) seconds per optimizer step at
  equal prompts, peak allocated / reserved memory, finite stats, and the memory planner's
  prediction of the learner alone (`apo_ray.memory`) next to the measured peak;
- the ZeRO-3 layer-by-layer gather used for weight sync equals the ZeRO-2 weights after the same step;
- the IPC weight sync's producer (`IpcWeightSync`) pushed twice into a consumer process on the same
  GPU that decodes the packed buffer the way vLLM 0.32's receiver does (rebuild the CUDA IPC
  handle once per export, split by tensor sizes, view as dtype, reshape, clone): bit-exact tensors,
  learner memory flat between pushes (CUDA only);
- bf16 weights with fp32 vs bf16 gradient accumulation: the relative error of the gradient norm
  against an fp32 one-shot reference.

It writes the table to stdout and JSON to runs/gpu_check.json; it exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import TrainConfig, load_config
from apo_ray.memory import GIB, ModelShape, learner_bytes

SHAPES_GPU = {
    "qwen2.5-0.5b-shaped": ModelShape(896, 24, 4864, 151936, 14, 2, True),
    "qwen2.5-1.5b-shaped": ModelShape(1536, 28, 8960, 151936, 12, 2, True),
}
SHAPES_CPU = {"tiny-a": ModelShape(128, 2, 256, 512, 2, 1, True), "tiny-b": ModelShape(128, 3, 384, 512, 2, 1, False)}


# ---------------------------------------------------------------- set-up


def _init_dist(device: str) -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def build_random_model(shape: ModelShape, out: Path) -> str:
    """An HF Qwen2 directory with random weights of `shape` (no tokenizer: the learner needs none)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return str(out)


def random_batch(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    from apo_ray.train.learner import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, vocab, (response,), generator=g).tolist() for _ in range(n)]
    reward = [float(i % 2) for i in range(n)]
    vstar = [0.125 * (i % 8) for i in range(n)]
    adv = [(-1.0) ** i for i in range(n)]
    return RolloutBatch.from_sequences(prompts, responses, None, reward, vstar, adv, pad_id=0)


def _cfg(zero: int, micro: int, **kw: Any) -> TrainConfig:
    return TrainConfig(lr=1e-5, beta2=1e-3, micro_batch_size=micro, zero_stage=zero, grad_clip=1.0, **kw)


def _learner(model: str, device: str, dtype: str, zero: int, micro: int, seqs: int, **kw: Any):
    from apo_ray.train.learner import Learner

    return Learner(
        model, _cfg(zero, micro, **kw), world_size=1, rank=0, device=device, dtype=dtype, seqs_per_optimizer_step=seqs
    )


def _release(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peaks(device: str) -> tuple[float | None, float | None]:
    if device != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


# ---------------------------------------------------------------- the checks


def check_step_time_and_memory(model: str, shape: ModelShape, device: str, dtype: str, zero: int, dims: dict) -> dict:
    """A*-PO (1 completion per prompt) vs GRPO (G=8) at equal prompts per optimizer step."""
    row: dict[str, Any] = {"zero": zero}
    prompts, micro, steps = dims["prompts"], dims["micro"], dims["steps"]
    for algo, group in (("astar_po", 1), ("grpo", 8)):
        seqs = prompts * group
        batch = random_batch(seqs, dims["prompt_len"], dims["response_len"], shape.vocab, seed=1)
        _reset_peak(device)
        learner = _learner(model, device, dtype, zero, micro, seqs)
        learner.train_minibatch(batch, algo=algo, normalizer_seqs=seqs)  # warm-up (allocations, kernels)
        t0 = time.perf_counter()
        for _ in range(steps):
            stats = learner.train_minibatch(batch, algo=algo, normalizer_seqs=seqs)
        if device == "cuda":
            torch.cuda.synchronize()
        row[f"{algo}_s_per_step"] = (time.perf_counter() - t0) / steps
        row[f"{algo}_finite"] = all(math.isfinite(stats[k]) for k in ("loss", "kl", "grad_norm", "entropy"))
        alloc, reserved = _peaks(device)
        row[f"{algo}_peak_alloc_gib"], row[f"{algo}_peak_reserved_gib"] = alloc, reserved
        cfg = load_config(
            None,
            [
                f"train.zero_stage={zero}",
                "train.num_learners=1",
                f"train.micro_batch_size={micro}",
                f"train.rollout_batch_size={prompts}",
                f"train.mini_batch_size={prompts}",
                f"sampling.max_prompt_tokens={dims['prompt_len']}",
                f"sampling.max_tokens={dims['response_len']}",
            ],
        )
        parts = learner_bytes(shape, cfg, dtype)
        row[f"{algo}_planned_gib"] = sum(parts.values()) / GIB
        _release(learner)
    row["grpo_over_astar_po"] = row["grpo_s_per_step"] / row["astar_po_s_per_step"]
    return row


def check_zero3_gather_equals_zero2(model: str, shape: ModelShape, device: str, dtype: str, dims: dict) -> dict:
    batch = random_batch(dims["prompts"], dims["prompt_len"], dims["response_len"], shape.vocab, seed=2)
    weights = {}
    for zero in (2, 3):
        learner = _learner(model, device, dtype, zero, dims["micro"], dims["prompts"])
        learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=dims["prompts"])
        weights[zero] = dict(learner.named_weights())
        _release(learner)
    # Adam's first step moves each weight by at most ~lr, and a near-zero gradient can flip sign
    # between the two reduction orders: allow 2.5 lr per element, plus one rounding of the model dtype.
    lr = _cfg(2, 1).lr
    ulp = 2**-8 if dtype == "bfloat16" else 2**-23
    worst, beyond = 0.0, 0
    for name, w2 in weights[2].items():
        diff = (weights[3][name].float() - w2.float()).abs()
        worst = max(worst, float(diff.max()))
        beyond += int((diff > 2.5 * lr + ulp * w2.float().abs()).sum())
    same_keys = set(weights[2]) == set(weights[3])
    return {
        "same_keys": same_keys,
        "max_abs_diff": worst,
        "lr": lr,
        "elements_beyond_tol": beyond,
        "ok": same_keys and beyond == 0,
    }


def check_grad_accumulation(model: str, shape: ModelShape, device: str, dims: dict) -> dict:
    """bf16 weights, 16 micro-batches of 1: fp32 vs bf16 accumulation against an fp32 one-shot gradient."""
    from apo_ray.train.learner import Learner

    n = 16
    batch = random_batch(n, dims["prompt_len"], dims["response_len"], shape.vocab, seed=3)

    def norm(dtype: str, micro: int, accum_dtype: str | None) -> float:
        original = Learner._ds_config
        if accum_dtype is not None:  # the same engine with another accumulation dtype

            def patched(self) -> dict:
                return {**original(self), "data_types": {"grad_accum_dtype": accum_dtype}}

            Learner._ds_config = patched
        try:
            learner = _learner(model, device, dtype, 2, micro, n)
        finally:
            Learner._ds_config = original
        value = learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=n)["grad_norm"]
        _release(learner)
        return value

    reference = norm("float32", n, None)
    fp32_acc = norm("bfloat16", 1, None)
    bf16_acc = norm("bfloat16", 1, "bf16")
    return {
        "reference_fp32_norm": reference,
        "bf16_weights_fp32_accum_rel_err": abs(fp32_acc - reference) / reference,
        "bf16_weights_bf16_accum_rel_err": abs(bf16_acc - reference) / reference,
    }


# ---------------------------------------------------------------- IPC sync into a consumer process (CUDA)


def _consumer(conn) -> None:
    """Decode packed IPC buckets as vLLM 0.32's `packed_ipc_consumer` does; answer with sha1 per tensor."""
    import base64
    import pickle

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    torch.cuda.set_device(0)
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    entry: tuple | None = None  # one mapping per export (vLLM's PackedBufferImporter)
    digests: dict[str, str] = {}
    while True:
        method, info = conn.recv()
        if method == "update_weights":
            args = list(pickle.loads(base64.b64decode(info["ipc_handles_pickled"]))[uuid])
            args[6] = 0  # the receiver's device index
            key = tuple(args)
            if entry is None or entry[0] != key:
                entry = (key, rebuild_cuda_tensor(*args))
            packed = entry[1][: sum(info["tensor_sizes"])]
            for name, dtype, shape, t in zip(
                info["names"], info["dtype_names"], info["shapes"], packed.split(info["tensor_sizes"])
            ):
                tensor = t.contiguous().view(getattr(torch, dtype)).view(shape).clone()
                digests[name] = hashlib.sha1(tensor.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
        elif method == "finish_weight_update":
            entry = None  # release the mapping: the producer can reclaim its buffer
            torch.cuda.synchronize()
            conn.send(digests)
            digests = {}
            continue
        elif method == "stop":
            conn.send(None)
            return
        conn.send(None)


class _EngineProxy:
    """The four vLLM weight-transfer calls `IpcWeightSync` makes, forwarded to the consumer process."""

    def __init__(self, conn):
        self.conn = conn
        self.digests: dict[str, str] = {}

    def _rpc(self, method: str, info: Any = None) -> Any:
        self.conn.send((method, info))
        return self.conn.recv()

    def init_weight_transfer_engine(self, info: dict) -> None:
        self._rpc("init", info)

    def start_weight_update(self) -> None:
        self._rpc("start")

    def update_weights(self, info: dict) -> None:
        self._rpc("update_weights", info)

    def finish_weight_update(self) -> None:
        self.digests = self._rpc("finish_weight_update")


def check_ipc_sync(model: str, dims: dict) -> dict:
    import torch.multiprocessing as mp

    from apo_ray.rollout.weight_sync import IpcWeightSync

    learner = _learner(model, "cuda", "bfloat16", 2, dims["micro"], dims["prompts"])
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(there,), daemon=True)
    proc.start()
    engine, sync = _EngineProxy(here), IpcWeightSync(rank=0, bucket_bytes=64 * 2**20)
    try:
        expected = {
            n: hashlib.sha1(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for n, t in learner.named_weights(on_device=True, skip_tied=True)
        }
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        after = []
        for _ in range(2):
            stats = sync.push(learner.named_weights(on_device=True, skip_tied=True), engine)
            torch.cuda.synchronize()
            after.append(torch.cuda.memory_allocated())
        exact = engine.digests == expected
        engine._rpc("stop")
    finally:
        proc.join(timeout=30)
        _release(learner)
    return {
        "tensors": stats.tensors,
        "gib": stats.bytes / GIB,
        "bit_exact": exact,
        "learner_alloc_growth_mib": (max(after) - before) / 2**20,
        "ok": exact and max(after) - before < 2**20,
    }


# ---------------------------------------------------------------- the table


def run(device: str, out: Path) -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu for the reduced check", file=sys.stderr)
        return 2
    _init_dist(device)
    dtype = "bfloat16" if device == "cuda" else "float32"
    shapes = SHAPES_GPU if device == "cuda" else SHAPES_CPU
    dims = (
        {"prompts": 32, "micro": 4, "steps": 3, "prompt_len": 256, "response_len": 512}
        if device == "cuda"
        else {"prompts": 8, "micro": 4, "steps": 2, "prompt_len": 8, "response_len": 8}
    )
    t0 = time.time()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "dims": dims,
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="apo-gpu-check-") as tmp:
        for name, shape in shapes.items():
            model = build_random_model(shape, Path(tmp) / name)
            entry: dict[str, Any] = {"params_b": shape.params / 1e9, "steps": []}
            for zero in (2, 3):
                row = check_step_time_and_memory(model, shape, device, dtype, zero, dims)
                ok &= row["astar_po_finite"] and row["grpo_finite"]
                entry["steps"].append(row)
            entry["zero3_gather"] = check_zero3_gather_equals_zero2(model, shape, device, dtype, dims)
            ok &= entry["zero3_gather"]["ok"]
            result["models"][name] = entry
        first_name, first = next(iter(shapes.items()))
        first_dir = str(Path(tmp) / first_name)
        if device == "cuda":
            result["grad_accumulation"] = check_grad_accumulation(first_dir, first, device, dims)
            result["ipc_sync"] = check_ipc_sync(first_dir, dims)
            ok &= result["ipc_sync"]["ok"]
        else:
            result["grad_accumulation"] = result["ipc_sync"] = "CUDA only"
    result["seconds"] = time.time() - t0
    result["imported_ray_or_vllm"] = sorted(m for m in ("ray", "vllm") if m in sys.modules)  # must stay empty
    result["ok"] = bool(ok) and not result["imported_ray_or_vllm"]
    print(format_table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    from apo_ray.storage import strict_json

    out.write_text(strict_json(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_table(r: dict) -> str:
    lines = [f"gpu_check on {r['device']} ({r['dtype']}, torch {r['torch']}), {r['date']}, {r['seconds']:.0f} s"]
    lines.append(
        "model                  zero  A*-PO s/step  GRPO s/step  GRPO/A*-PO  peak alloc (A*-PO/GRPO)  reserved  planned  finite"
    )
    for name, m in r["models"].items():
        for s in m["steps"]:
            lines.append(
                f"{name:<22} {s['zero']:>4}  {s['astar_po_s_per_step']:>12.3f}  {s['grpo_s_per_step']:>11.3f}  "
                f"{s['grpo_over_astar_po']:>10.2f}  {_gib(s['astar_po_peak_alloc_gib']):>8} / {_gib(s['grpo_peak_alloc_gib']):<8}"
                f"     {_gib(s['grpo_peak_reserved_gib']):>8}  {s['astar_po_planned_gib']:.2f}/{s['grpo_planned_gib']:.2f}"
                f"  {s['astar_po_finite'] and s['grpo_finite']}"
            )
        z = m["zero3_gather"]
        lines.append(
            f"{name:<22} ZeRO-3 gather == ZeRO-2 weights after one step: {z['ok']} "
            f"(max |diff| {z['max_abs_diff']:.1e}, lr {z['lr']:g}, {z['elements_beyond_tol']} beyond tolerance)"
        )
    g = r["grad_accumulation"]
    if isinstance(g, dict):
        lines.append(
            f"grad norm vs fp32 one-shot: fp32 accumulation {g['bf16_weights_fp32_accum_rel_err']:.2e}, "
            f"bf16 accumulation {g['bf16_weights_bf16_accum_rel_err']:.2e} (relative error)"
        )
    else:
        lines.append(f"grad accumulation: {g}")
    i = r["ipc_sync"]
    if isinstance(i, dict):
        lines.append(
            f"IPC sync x2 into a consumer process: {i['tensors']} tensors, {i['gib']:.2f} GiB, bit-exact {i['bit_exact']}, "
            f"learner memory growth {i['learner_alloc_growth_mib']:.1f} MiB"
        )
    else:
        lines.append(f"IPC sync: {i}")
    lines.append(f"all checks passed: {r['ok']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="jobs/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="runs/gpu_check.json")
    args = p.parse_args(argv)
    return run(args.device, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
