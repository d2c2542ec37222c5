"""Benchmarks (numbers for the README, never timed asserts).

    python jobs/bench.py stage1  --config demo [--rounds 3]   # jobs/vstar.py vs a bare vllm.LLM.generate script, spawn to exit
    python jobs/bench.py stage2  --config demo [--algos astar_po]   # s/step split generate/train/sync, A*-PO vs GRPO (G=8)
    python jobs/bench.py compare --config demo --seeds 3 train.eval_every=32   # A*-PO vs GRPO: time to a target, mean +- s.e. over seeds
    python jobs/bench.py load    --config demo   # Stage 1 at 1x, 5x, 20x the prompts: throughput, peak RSS
    python jobs/bench.py floor   --config demo --steps 30   # Stage 1 and 2 against one plain process (the floor)
    python jobs/bench.py sweep   --config demo              # the same across model sizes and response lengths
    python jobs/bench.py parts   --config demo              # a step's pieces timed apart, one process each side
    python jobs/bench.py warmstart   # the tiny model built with this CPU's kernels and with AVX2's: same accuracy?

Each writes JSON under runs/bench/ and prints a table. They run on whatever machine
they are started on; the README says which machine each quoted figure came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

from apo_ray.config import Config, ConfigError, load_config
from apo_ray.storage import strict_json

log = logging.getLogger("apo_ray.bench")
OUT = Path("runs/bench")


def _with(cfg: Config, **sections) -> Config:
    """A copy of cfg with fields replaced per section: _with(cfg, train={"algo": "grpo"})."""
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


# ---------------------------------------------------------------- stage 1


_BARE_VLLM = """
import json, os, sys, time
t0 = time.perf_counter()
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would replace kv_cache_memory_bytes, as in RolloutEngine
from vllm import LLM, SamplingParams
t1 = time.perf_counter()
job = json.load(open(sys.argv[1]))
llm = LLM(**job["engine"])
t2 = time.perf_counter()
params = [SamplingParams(**job["sampling"], seed=job["seed"] + i) for i in range(len(job["prompts"]))]
outs = llm.generate(job["prompts"], params, use_tqdm=False)
t3 = time.perf_counter()
tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
print("BARE " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2, "tokens": tokens}))
"""


def _timed_process(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[float, str]:
    """Run `cmd` to its end; (seconds from spawn to exit, its stdout). Its output also goes to log_path."""
    import os
    import subprocess

    t = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}); its output: {log_path}")
    return seconds, done.stdout


def bench_stage1(cfg: Config, rounds: int = 1) -> dict:
    """Stage 1 against a bare vllm.LLM.generate of the same prompts and params, each as a whole process.

    Each side is a command a user would run, timed from spawn to exit: `python jobs/vstar.py` (its
    own embedded Ray, Ray Data, the sampler actor, parquet, Ray's shutdown; with RAY_ADDRESS set it
    joins that Ray instead) and a script that only imports vLLM, starts one engine (in-process,
    eager, as the pipeline's) and generates everything in one call. Run before this process starts a
    Ray of its own, so that nothing else runs.

    Args:
        rounds: pipeline / bare pairs, run one after the other (the order swapped every round, so
            that a machine slowing down in the hour does not favour one side); each round's ratio is
            kept, and the top-level figures are the medians over rounds (`stage1_summary`).
    """
    import json
    import os

    from apo_ray.config import to_yaml
    from apo_ray.data import load_prompts
    from apo_ray.model import resolve_model
    from apo_ray.runtime import resolve_dtype

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    model = resolve_model(cfg.model.path)  # built now if missing, untimed
    cfg = _with(cfg, vstar={"output_dir": str((OUT / "stage1_vstar").resolve()), "overwrite": True})
    OUT.mkdir(parents=True, exist_ok=True)
    cfg_path = (OUT / "stage1_config.yaml").resolve()
    cfg_path.write_text(to_yaml(cfg))
    s = cfg.sampling
    job = {
        "engine": {
            "model": model,
            "dtype": resolve_dtype(cfg.model.dtype, "cpu"),
            "max_model_len": s.max_prompt_tokens + s.max_tokens,
            "seed": s.seed,
            "max_num_seqs": cfg.engine.max_num_seqs,
            "enforce_eager": cfg.engine.enforce_eager,  # as the pipeline's engines (RolloutEngine)
            "distributed_executor_backend": "uni",  # one process, as ours (`single_process_cpu_kwargs`)
            "kv_cache_memory_bytes": int(cfg.engine.cpu_kvcache_gib * 2**30),  # as ours
        },
        "sampling": {
            "n": cfg.vstar.num_samples,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        },
        "seed": s.seed,
        "prompts": [r["prompt"] for r in load_prompts(cfg.data, "train").rows],
    }
    job_path = OUT / "stage1_bare_job.json"
    job_path.write_text(json.dumps(job))
    sides = {"pipeline": lambda: _stage1_pipeline(cfg, cfg_path), "bare": lambda: _stage1_bare(job_path)}
    per_round = []
    try:
        for r in range(rounds):
            order = ("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")
            got = {side: sides[side]() for side in order}
            per_round.append(_stage1_round(got["pipeline"], got["bare"], first=order[0]))
            if rounds > 1:
                print(f"  round {r + 1}/{rounds} ({order[0]} first): ratio {per_round[-1]['ratio_processes']:.2f}")
    finally:
        os.remove(job_path)
    res = {"prompts": len(job["prompts"]), "num_samples": cfg.vstar.num_samples, "ray": _ray_in_use(cfg)}
    res.update(stage1_summary(per_round))
    runs = f" (medians of {rounds} rounds)" if rounds > 1 else ""
    print(
        f"Stage 1 ({res['prompts']} prompts x N={res['num_samples']}), each side a whole process, spawn to exit, "
        f"on {res['ray']}{runs}:\n"
        f"  python jobs/vstar.py            {res['pipeline_process_s']:6.1f} s "
        f"(its own clock {res['pipeline_wall_s']:.1f} s; shards {res['pipeline_in_actor_shard_s']:.1f} s)\n"
        f"  bare vllm.LLM.generate script   {res['bare_process_s']:6.1f} s "
        f"(import {res['bare_import_s']:.1f}, engine {res['bare_load_s']:.1f}, generate {res['bare_generate_s']:.1f} s)\n"
        f"  ratio (tokens/s) {res['ratio_processes']:.2f}; in the actors vs bare generate alone "
        f"{res['ratio_in_actor_steady_state']:.2f}"
        + (
            f"\n  ratio per round: {', '.join(f'{x:.2f}' for x in res['ratio_processes_per_round'])}"
            if rounds > 1
            else ""
        )
    )
    return res


def _ray_in_use(cfg: Config) -> str:
    """Which Ray the pipeline's process runs on: the one `init_ray` would join, else one it starts itself."""
    from apo_ray.runtime import ray_address

    addr = ray_address(cfg.resources)
    return f"the running Ray at {addr}" if addr else "an embedded Ray it starts and stops"


def _stage1_pipeline(cfg: Config, cfg_path: Path) -> dict:
    """`python jobs/vstar.py` on cfg_path, spawn to exit, with what its manifest and shard sidecars say."""
    from apo_ray.storage import fs_read_json, get_fs
    from apo_ray.vstar.pipeline import stats_name

    jobs_vstar = Path(__file__).resolve().parents[1] / "jobs" / "vstar.py"
    pipe_s, _ = _timed_process(
        [sys.executable, str(jobs_vstar), "--config", str(cfg_path)], {}, OUT / "stage1_pipeline.log"
    )
    fs, root = get_fs(cfg.vstar.output_dir)
    manifest = fs_read_json(fs, f"{root}/manifest.json")
    # Steady state: the time actors spent on shards (generate + score + V* + parquet write), from
    # each shard's stats sidecar.
    shard_s = sum(fs_read_json(fs, f"{root}/{stats_name(i)}")["seconds"] for i in range(len(manifest["shards"])))
    return {
        "process_s": pipe_s,
        "wall_s": manifest["wall_time_s"],  # the job's own clock: its checks to its manifest
        "shard_s": shard_s,
        "tokens": manifest["counts"]["generated_tokens"],
    }


def _stage1_bare(job_path: Path) -> dict:
    """The bare vLLM script on job_path, spawn to exit, with its own phase times."""
    import json

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    bare_s, out = _timed_process([sys.executable, "-c", _BARE_VLLM, str(job_path)], env, OUT / "stage1_bare.log")
    return {"process_s": bare_s, **json.loads(next(x for x in out.splitlines() if x.startswith("BARE "))[5:])}


def _stage1_round(pipe: dict, bare: dict, first: str) -> dict:
    """One round's figures from `_stage1_pipeline` and `_stage1_bare`; ratios are tokens/s, pipeline over bare."""
    return {
        "first": first,
        "bare_process_s": bare["process_s"],
        "bare_import_s": bare["import_s"],
        "bare_load_s": bare["load_s"],
        "bare_generate_s": bare["generate_s"],
        "bare_tokens": bare["tokens"],
        "pipeline_process_s": pipe["process_s"],
        "pipeline_wall_s": pipe["wall_s"],
        "pipeline_in_actor_shard_s": pipe["shard_s"],
        "pipeline_tokens": pipe["tokens"],
        "ratio_processes": (pipe["tokens"] / pipe["process_s"]) / (bare["tokens"] / bare["process_s"]),
        "ratio_in_actor_steady_state": (pipe["tokens"] / pipe["shard_s"]) / (bare["tokens"] / bare["generate_s"]),
    }


def stage1_summary(per_round: list[dict]) -> dict:
    """The rounds of `bench_stage1` in one dict: every figure's median over the rounds (one round: its
    own figures), each ratio's value per round, and the rounds themselves."""
    if not per_round:
        raise ValueError("no rounds to summarise")
    keys = [k for k, v in per_round[0].items() if isinstance(v, (int, float))]
    out: dict = {k: statistics.median(r[k] for r in per_round) for k in keys}
    for k in ("ratio_processes", "ratio_in_actor_steady_state"):
        out[f"{k}_per_round"] = [r[k] for r in per_round]
    out["rounds"] = per_round
    return out


# ---------------------------------------------------------------- stage 2


def _train_rows(cfg: Config) -> list[dict]:
    from apo_ray import train
    from apo_ray.metrics import read_metrics

    train.run(cfg)
    return read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows[1:] or rows]  # step 1 includes one-off warm-up
    return statistics.fmean(vals)


STEP_KEYS = ("step_s", "generate_s", "train_s", "sync_s", "peak_mem_gb", "response_len")


def _stage2_vstar(cfg: Config) -> Config:
    """cfg pointed at this bench's scratch V* (computed if missing or made with another config)."""
    from apo_ray import vstar

    cfg = _with(cfg, vstar={"output_dir": str(OUT / "stage2_vstar")}, train={"vstar_dir": str(OUT / "stage2_vstar")})
    try:
        vstar.run(cfg)  # reused when complete and made with this config
    except ConfigError:  # made with another model/config: it is this bench's scratch, redo it
        log.info("bench stage2: recomputing its scratch V* in %s", cfg.vstar.output_dir)
        vstar.run(_with(cfg, vstar={"overwrite": True}))
    return cfg


def _stage2_run(cfg: Config, algo: str, steps: int) -> dict:
    """Mean seconds per step and per phase of a fresh Stage 2 run of `algo` (steps 2..steps)."""
    c = _with(
        cfg,
        train={
            "algo": algo,
            "group_size": 8,
            "num_steps": steps,
            "output_dir": str(OUT / f"stage2_{algo}"),
            "save_every": 10_000,
            "eval_every": 0,
            "micro_batch_size": cfg.train.micro_batch_size,
        },
    )
    _clean(c.train.output_dir)
    rows = _train_rows(c)
    res = {k: _mean(rows, k) for k in STEP_KEYS}
    # What the recipe does not time apart: scoring, building the batch, the metrics' reduction.
    res["other_s"] = res["step_s"] - res["generate_s"] - res["train_s"] - res["sync_s"]
    res["logprob_gap_max"] = max(r["logprob_gap"] for r in rows)
    return res


def bench_stage2(cfg: Config, steps: int = 12, algos: tuple[str, ...] = ("astar_po", "grpo")) -> dict:
    """Seconds per step (generate / train / sync) for A*-PO and GRPO(G=8) at equal prompts per step."""
    cfg = _stage2_vstar(cfg)
    res = {}
    for algo in algos:
        res[algo] = _stage2_run(cfg, algo, steps)
        res[algo]["sequences_per_step"] = cfg.train.rollout_batch_size * (8 if algo == "grpo" else 1)
    print(f"Stage 2, {cfg.train.rollout_batch_size} prompts/step, mean over steps 2..{steps}:")
    print(f"  {'algo':10s} {'seqs':>5s} {'step_s':>7s} {'gen_s':>7s} {'train_s':>7s} {'sync_s':>7s} {'peak_GB':>8s}")
    for k in algos:
        r = res[k]
        print(
            f"  {k:10s} {r['sequences_per_step']:5d} {r['step_s']:7.3f} {r['generate_s']:7.3f} {r['train_s']:7.3f} "
            f"{r['sync_s']:7.3f} {r['peak_mem_gb']:8.2f}"
        )
    if "astar_po" in res:
        a = res["astar_po"]
        res["astar_sync_fraction"] = a["sync_s"] / a["step_s"]
        print(f"  A*-PO sync share = {100 * res['astar_sync_fraction']:.1f} %")
    if "astar_po" in res and "grpo" in res:
        res["grpo_over_astar_step_time"] = res["grpo"]["step_s"] / res["astar_po"]["step_s"]
        print(f"  GRPO step / A*-PO step = {res['grpo_over_astar_step_time']:.2f}")
    return res


# ---------------------------------------------------------------- floor

FLOOR_STEP_KEYS = ("step_s", "generate_s", "score_s", "update_s", "response_len")


def floor_figures(cfg: Config, steps: int) -> dict:
    """The floor (`apo_ray.floor`) in this process: start-up, the V* pass over the training prompts
    (N samples each), then `steps` A*-PO steps; per-step means over steps 2..steps."""
    import gc

    import torch

    from apo_ray.data import load_prompts
    from apo_ray.floor import Floor, floor_steps
    from apo_ray.model import resolve_model

    prompts = load_prompts(cfg.data, "train").rows
    floor = Floor(resolve_model(cfg.model.path), cfg)
    vstar_P, vpass = floor.vstar_pass(prompts, seed=cfg.sampling.seed)
    rows = floor_steps(floor, prompts, vstar_P, cfg, steps)
    res = {
        "threads": torch.get_num_threads(),
        "start_s": floor.start_s,
        "vstar_pass": {**vpass, "prompts": len(prompts), "num_samples": cfg.vstar.num_samples},
        "vstar_pass_incl_start_s": vpass["total_s"] + floor.start_s,
        "step": {k: _mean(rows, k) for k in FLOOR_STEP_KEYS},
        "reward_mean": statistics.fmean(r["reward_mean"] for r in rows),
    }
    del floor
    gc.collect()
    return res


def _bracket(before: dict, after: dict) -> dict:
    """The floor's figures as the mean of two runs (`floor_figures`), one on each side of apo-ray's."""

    def mean(a, b):
        if isinstance(a, dict):
            return {k: mean(a[k], b[k]) for k in a}
        return (a + b) / 2 if isinstance(a, float) else a

    return mean(before, after)


def bench_floor(cfg: Config, steps: int = 30) -> dict:
    """apo-ray's Stage 1 and Stage 2 against the floor, all in this run (same machine, same minutes).

    The floor runs first, before Ray starts (nothing else in this process then); then Stage 1 (the
    pipeline and a bare vllm.LLM.generate, `bench_stage1`) and an A*-PO Stage 2 run of `steps` steps;
    then, with Ray stopped, the floor again. This machine's speed drifts by 10-20 % within an hour:
    apo-ray's figures are divided by the mean of the two floors, which bracket them in time.
    """
    import ray

    from apo_ray.runtime import init_ray, stop_monitor_first

    before = floor_figures(cfg, steps)
    s1 = bench_stage1(cfg)  # its own processes, before this one starts a Ray
    init_ray(cfg.resources)
    s2 = _stage2_run(_stage2_vstar(cfg), "astar_po", steps)
    stop_monitor_first()
    ray.shutdown()  # an idle Ray's processes would slow the floor's second run (~10 %)
    after = floor_figures(cfg, steps)
    floor = _bracket(before, after)
    fs, fv = floor["step"], floor["vstar_pass"]
    res = {
        "floor": floor,
        "floor_before": before,
        "floor_after": after,
        "stage1": s1,
        "stage2_astar_po": s2,
        "ratios": {
            # targets: <= 1.5, < 0.05, >= 0.8, <= 2
            "stage2_step_over_floor_step": s2["step_s"] / fs["step_s"],
            "stage2_sync_share_of_step": s2["sync_s"] / s2["step_s"],
            "stage1_over_bare_vllm_processes": s1["ratio_processes"],
            "stage1_wall_over_floor_vstar_pass": s1["pipeline_wall_s"] / floor["vstar_pass_incl_start_s"],
            "stage2_generate_over_floor_generate": s2["generate_s"] / fs["generate_s"],
            "stage2_train_over_floor_update": s2["train_s"] / fs["update_s"],
            "stage1_work_over_floor_vstar_pass": s1["pipeline_in_actor_shard_s"] / fv["total_s"],
        },
    }
    r = res["ratios"]
    print(
        f"Floor (one process, HF generate + torch AdamW, {floor['threads']} threads) vs apo-ray, same run; "
        f"the floor's step {before['step']['step_s']:.3f} s before apo-ray ran, {after['step']['step_s']:.3f} s "
        "after (their mean below):"
    )
    print(f"  {'':28s} {'floor':>8s} {'apo-ray':>8s} {'ratio':>6s}  target")
    rows = (
        ("Stage 2 step s", fs["step_s"], s2["step_s"], r["stage2_step_over_floor_step"], "<= 1.5"),
        ("  generate s", fs["generate_s"], s2["generate_s"], r["stage2_generate_over_floor_generate"], ""),
        ("  update / train s", fs["update_s"], s2["train_s"], r["stage2_train_over_floor_update"], ""),
        ("  sync s (share of step)", 0.0, s2["sync_s"], r["stage2_sync_share_of_step"], "< 0.05 share"),
        (
            "Stage 1 wall s (incl start)",
            floor["vstar_pass_incl_start_s"],
            s1["pipeline_wall_s"],
            r["stage1_wall_over_floor_vstar_pass"],
            "<= 2",
        ),
        ("Stage 1 work s", fv["total_s"], s1["pipeline_in_actor_shard_s"], r["stage1_work_over_floor_vstar_pass"], ""),
    )
    for name, a, b, q, target in rows:
        print(f"  {name:28s} {a:8.3f} {b:8.3f} {q:6.2f}  {target}")
    print(
        "  Stage 1 vs a bare vllm.LLM.generate script, tokens/s, both whole processes: "
        f"{r['stage1_over_bare_vllm_processes']:.2f} (>= 0.8)"
    )
    return res


LOAD_SCALES = (1, 5, 20)

_LOAD_ONE = """
import json, sys
from apo_ray.config import load_config
from apo_ray.runtime import setup_logging
from apo_ray import vstar
setup_logging()
m = vstar.run(load_config(sys.argv[1], sys.argv[2:]))
keep = ("wall_time_s", "generation_wall_time_s", "prompts_per_s", "generated_tokens_per_s",
        "actor_peak_rss_mb", "driver_peak_rss_mb")
print("LOAD " + json.dumps({k: m[k] for k in keep} | {"prompts": m["counts"]["prompts_in"]}))
"""


def bench_load(config: str, overrides: list[str]) -> dict:
    """Stage 1 at 1x, 5x and 20x the config's prompt count, each in a fresh process with its own Ray:
    throughput and the peak RSS of the driver and of a sampler actor. The driver holds the prompts
    and one stats row per shard, never the completions, so its peak should stay flat.

    The demo's 2-digit task has only ~5,000 distinct training problems, so the prompts are 3-digit
    additions (same prompt and completion lengths within a token or two) at every scale.
    """
    import json
    import subprocess

    from apo_ray.model import resolve_model

    cfg = load_config(config, overrides)
    resolve_model(cfg.model.path)  # build the tiny model now, so that no timed run includes it
    base = cfg.data.arith.num_train
    rows = []
    for k in LOAD_SCALES:
        extra = [
            "data.arith.digits=3",
            f"data.arith.num_train={base * k}",
            f"vstar.output_dir={OUT / f'load_{k}x'}",
            "vstar.overwrite=true",
        ]
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_ONE, config, *overrides, *extra], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"load bench at {k}x failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("LOAD "))
        rows.append({"scale": k, **json.loads(line[5:])})
        r = rows[-1]
        print(
            f"{k:>3}x {r['prompts']:>6} prompts: {r['wall_time_s']:6.1f} s, {r['prompts_per_s']:7.1f} prompts/s, "
            f"{r['generated_tokens_per_s']:6.0f} tokens/s, driver peak {r['driver_peak_rss_mb']:.0f} MiB, "
            f"actor peak {r['actor_peak_rss_mb']:.0f} MiB"
        )
    return {"load": rows}


def _clean(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- warm start across CPUs

# PyTorch's, MKL's and oneDNN's kernels held to AVX2: another CPU, simulated on this one.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
_BUILD = (
    "import json, sys, torch; from apo_ray.model.tiny import build_tiny_model; build_tiny_model(sys.argv[1]); "
    "print(json.dumps({'cpu_capability': torch.backends.cpu.get_cpu_capability()}))"
)


def bench_warmstart() -> dict:
    """The tiny model's default recipe built twice from scratch, each in a fresh process: with this CPU's
    kernels, then with them held to AVX2 (AVX2_ENV). A warm start that lands in the same place on any
    machine gives the same held-out accuracies (the target: within 3 points)."""
    import json
    import os
    import subprocess
    import tempfile

    from apo_ray.model.tiny import RECIPE_FILE

    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in (("native", {}), ("avx2", AVX2_ENV)):
            out = Path(tmp) / name
            t = time.time()
            done = subprocess.run(
                [sys.executable, "-c", _BUILD, str(out)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            info = json.loads((out / RECIPE_FILE).read_text())
            builds[name] = {
                **json.loads(done.stdout.strip().splitlines()[-1]),
                "env": env,
                "accuracy_greedy": info["accuracy_greedy"],
                "accuracy_sampled": info["accuracy_sampled"],
                "final_loss": info["final_loss"],
                "build_s": round(time.time() - t, 1),
            }
    recipe = info["recipe"]
    gaps = {k: abs(builds["native"][f"accuracy_{k}"] - builds["avx2"][f"accuracy_{k}"]) for k in ("greedy", "sampled")}
    print(f"tiny model warm start ({recipe['steps']} steps, {recipe['num_eval']} held-out prompts):")
    for name, b in builds.items():
        print(
            f"  {name:7s} kernels {b['cpu_capability']:8s} greedy {b['accuracy_greedy']:.3f}  "
            f"sampled {b['accuracy_sampled']:.3f}  loss {b['final_loss']:.4f}  ({b['build_s']:.0f} s)"
        )
    print(f"  gap: greedy {gaps['greedy'] * 100:.1f} points, sampled {gaps['sampled'] * 100:.1f} (target <= 3)")
    return {"recipe": recipe, "builds": builds, "gap": gaps}


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {n}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench command line; overrides may come before or after the options."""
    p = argparse.ArgumentParser(
        prog="jobs/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("which", choices=("stage1", "stage2", "compare", "load", "floor", "sweep", "parts", "warmstart"))
    p.add_argument("--config", "-c", default="demo")
    p.add_argument("--steps", type=int, default=12, help="stage2, floor: steps per run")
    p.add_argument("--budget", type=float, default=240.0, help="compare: wall-clock seconds per run")
    p.add_argument("--seeds", type=int, default=3, help="compare: seeds per algorithm")
    p.add_argument("--lr-grid", default="5e-7,1e-6", help="compare: the lrs tried on seed 0 (comma-separated)")
    p.add_argument("--prompts", type=int, default=256, help="sweep: Stage 1 prompts per point")
    p.add_argument("--algos", default="astar_po,grpo", help="stage2: comma-separated algorithms to time")
    p.add_argument("--repeats", type=int, default=30, help="parts: timed calls per piece")
    p.add_argument(
        "--rounds", type=_positive_int, default=1, help="stage1: pipeline / bare pairs, in alternating order"
    )
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.eval_every=25")
    # Plain parse_args() rejects `compare --budget 120 train.eval_every=25`: the positional
    # overrides were already consumed (empty) before the options.
    return p.parse_intermixed_args(argv)


def bench_command(argv: list[str]) -> str:
    """The command line that made a bench's JSON, with the Ray it joined when RAY_ADDRESS chose one."""
    import os
    import shlex

    addr = os.environ.get("RAY_ADDRESS")
    return " ".join([*([f"RAY_ADDRESS={shlex.quote(addr)}"] if addr else []), "python jobs/bench.py", *argv])


def main(argv: list[str] | None = None) -> int:
    from apo_ray.runtime import setup_logging

    args = parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    OUT.mkdir(parents=True, exist_ok=True)
    from apo_ray.runtime import init_ray, versions

    t = time.time()
    # load, stage1: a Ray per process they start; floor, sweep: later
    if args.which not in ("load", "stage1", "floor", "sweep", "parts", "warmstart"):
        init_ray(cfg.resources)
    if args.which == "warmstart":
        res = bench_warmstart()
    elif args.which == "parts":
        from apo_ray.parts import bench_parts

        res = bench_parts(args.config, args.overrides, args.repeats)
    elif args.which == "floor":
        res = bench_floor(cfg, args.steps)
    elif args.which == "sweep":
        from apo_ray.sweep import bench_sweep

        init_ray(cfg.resources)
        res = bench_sweep(cfg, args.steps, args.prompts)
    elif args.which == "load":
        res = bench_load(args.config, args.overrides)
    elif args.which == "stage1":
        res = bench_stage1(cfg, args.rounds)
    elif args.which == "stage2":
        res = bench_stage2(cfg, args.steps, tuple(args.algos.split(",")))
    else:
        from apo_ray.compare import bench_compare

        res = bench_compare(cfg, args.budget, args.seeds, tuple(float(x) for x in args.lr_grid.split(",")))
    res["bench_seconds"] = time.time() - t
    res["versions"] = versions()
    res["command"] = bench_command(argv if argv is not None else sys.argv[1:])
    out = OUT / f"{args.which}.json"
    out.write_text(strict_json(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
