"""A*-PO against GRPO with statistics: several seeds, each algorithm at the lr it does best with.

    python jobs/bench.py compare --config demo --seeds 3 --lr-grid 5e-7,1e-6 --budget 240 train.eval_every=32

1. lr: on seed 0, each algorithm runs once per lr of the same grid (`--lr-grid`); the lr whose
   held-out accuracy curve has the highest mean (area under the curve: reaching accuracy early
   counts) is kept for that algorithm, and that run is seed 0's.
2. seeds 1..n-1: Stage 1 again with the seed's sampling (A*-PO's clock starts with it), then each
   algorithm at its lr. Held-out greedy accuracy is measured every `train.eval_every` A*-PO steps
   and every eval_every / G GRPO steps (the same number of sampled completions between evals).
3. target = the starting accuracy + 90 % of the way to the lowest final accuracy of any run (so
   every run reaches it); per algorithm, the mean and standard error over seeds of the seconds to
   reach it: A*-PO with Stage 1's wall time counted, and with only its work (in-actor seconds)
   counted; GRPO has no Stage 1. KL to the reference (the training batches' mean log-ratio) at the
   first eval that reaches the target, and along the curves.

Every run gets the same wall-clock budget; A*-PO's includes its Stage 1. Writes
runs/bench/compare.json and compare.png (accuracy against seconds: the mean over seeds, with a
band of one standard error).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path

from apo_ray.config import Config

log = logging.getLogger("apo_ray.bench")

GROUP = 8  # GRPO's group size (its usual setting)
TARGET_FRAC = 0.9


# ---------------------------------------------------------------- pure parts


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def first_reach(curve: list[dict], target: float) -> dict | None:
    """The first trained point (step > 0) of `curve` at or above `target`, or None."""
    return next((p for p in curve if p["step"] > 0 and p["accuracy"] >= target), None)


def curve_mean(curve: list[dict]) -> float:
    """Mean accuracy over the curve's evals after training started (higher: better, and earlier)."""
    trained = [p["accuracy"] for p in curve if p["step"] > 0]
    return statistics.fmean(trained) if trained else curve[0]["accuracy"]


def accuracy_at(curve: list[dict], t: float, key: str = "seconds") -> float:
    """Accuracy at time t: that of the last eval at or before t (the curve is a step function)."""
    acc = curve[0]["accuracy"]
    for p in curve:
        if p[key] <= t:
            acc = p["accuracy"]
    return acc


def band(curves: list[list[dict]], grid: list[float], key: str = "seconds") -> list[tuple[float, float]]:
    """(mean, standard error) over `curves` of `accuracy_at` at each time of `grid`."""
    return [mean_se([accuracy_at(c, t, key) for c in curves]) for t in grid]


def target_accuracy(base: float, finals: list[float], frac: float = TARGET_FRAC) -> float:
    """`frac` of the way from the starting accuracy to the lowest final accuracy of any run."""
    return base + frac * (min(finals) - base)


def summarize(runs: list[dict], base: float) -> dict:
    """Per algorithm: seconds to the target (mean, s.e., per seed; A*-PO also with Stage 1's work
    only) and KL at the first eval that reaches it. `runs`: {"algo", "seed", "curve"} each."""
    target = target_accuracy(base, [r["curve"][-1]["accuracy"] for r in runs])
    out: dict = {"target_accuracy": target}
    for algo in sorted({r["algo"] for r in runs}):
        mine = [r for r in runs if r["algo"] == algo]
        reach = [first_reach(r["curve"], target) for r in mine]
        wall = [p["seconds"] for p in reach if p is not None]
        work = [p["work_seconds"] for p in reach if p is not None]
        kl = [p["kl"] for p in reach if p is not None]
        out[algo] = {
            "seeds": [r["seed"] for r in mine],
            "reached": len(wall),
            "seconds_to_target": wall,
            "seconds_to_target_mean_se": mean_se(wall) if wall else None,
            "work_seconds_to_target_mean_se": mean_se(work) if work else None,
            "kl_at_target_mean_se": mean_se(kl) if kl else None,
            "final_accuracy_mean_se": mean_se([r["curve"][-1]["accuracy"] for r in mine]),
        }
    a, g = out.get("astar_po"), out.get("grpo")
    if a and g and a["seconds_to_target_mean_se"] and g["seconds_to_target_mean_se"]:
        gm = g["seconds_to_target_mean_se"][0]
        out["time_ratio_astar_over_grpo"] = a["seconds_to_target_mean_se"][0] / gm
        out["time_ratio_astar_over_grpo_stage1_work_only"] = a["work_seconds_to_target_mean_se"][0] / gm
    return out


# ---------------------------------------------------------------- runs


def _stage1(cfg: Config, seed: int) -> tuple[Config, float, float]:
    """Stage 1 with this seed's sampling into a scratch dir: (cfg pointed at it, wall s, work s)."""
    from apo_ray import vstar
    from apo_ray.bench import OUT, _with

    c = _with(
        cfg,
        sampling={"seed": seed},
        vstar={"output_dir": str(OUT / f"compare_vstar_seed{seed}"), "overwrite": True},
        train={"vstar_dir": str(OUT / f"compare_vstar_seed{seed}")},
    )
    t = time.time()
    manifest = vstar.run(c)
    return c, time.time() - t, manifest["shard_seconds"]


def run_one(cfg: Config, algo: str, seed: int, lr: float, budget_s: float, stage1: tuple[float, float], base: float):
    """One Stage 2 run of `algo` on `budget_s` wall-clock seconds (A*-PO's include Stage 1's)."""
    from apo_ray.bench import OUT, _clean, _train_rows, _with

    s1_wall, s1_work = stage1 if algo == "astar_po" else (0.0, 0.0)
    every = cfg.train.eval_every or 16
    c = _with(
        cfg,
        sampling={"seed": seed},
        train={
            "algo": algo,
            "group_size": GROUP,
            "lr": lr,
            "seed": seed,
            "num_steps": 100_000,
            "output_dir": str(OUT / f"compare_{algo}_lr{lr:g}_seed{seed}"),
            "max_train_seconds": budget_s - s1_wall,
            "save_every": 100_000,
            "eval_every": every if algo == "astar_po" else max(1, round(every / GROUP)),
        },
    )
    _clean(c.train.output_dir)
    rows = _train_rows(c)
    curve = [{"seconds": 0.0, "work_seconds": 0.0, "step": 0, "accuracy": base, "kl": 0.0}] + [
        {
            "seconds": s1_wall + r["time_s"],
            "work_seconds": s1_work + r["time_s"],
            "step": r["step"],
            "accuracy": r["eval_accuracy"],
            "kl": r["kl"],
        }
        for r in rows
        if r.get("eval_accuracy") is not None
    ]
    log.info(
        "compare: %s lr=%g seed=%d: %d steps, final held-out %.3f",
        algo,
        lr,
        seed,
        rows[-1]["step"],
        curve[-1]["accuracy"],
    )
    return {"algo": algo, "seed": seed, "lr": lr, "steps": rows[-1]["step"], "curve": curve}


def bench_compare(cfg: Config, budget_s: float, seeds: int = 3, lr_grid: tuple[float, ...] = (5e-7, 1e-6)) -> dict:
    """See the module doc."""
    from apo_ray import evaluation
    from apo_ray.bench import OUT
    from apo_ray.data import load_prompts
    from apo_ray.model import resolve_model

    model = resolve_model(cfg.model.path)
    eval_rows = load_prompts(cfg.data, "eval").rows
    base = evaluation.evaluate(model, eval_rows, cfg, ref_path=model)["accuracy"]
    stage1: dict[int, tuple[float, float]] = {}
    c0, wall, work = _stage1(cfg, 0)
    stage1[0] = (wall, work)
    tuning: dict[str, list[dict]] = {}
    lr: dict[str, float] = {}
    runs: list[dict] = []
    for algo in ("astar_po", "grpo"):
        tuning[algo] = [run_one(c0, algo, 0, x, budget_s, stage1[0], base) for x in lr_grid]
        best = max(tuning[algo], key=lambda r: curve_mean(r["curve"]))
        lr[algo] = best["lr"]
        runs.append(best)
    for seed in range(1, seeds):
        c, wall, work = _stage1(cfg, seed)
        stage1[seed] = (wall, work)
        runs += [run_one(c, algo, seed, lr[algo], budget_s, stage1[seed], base) for algo in ("astar_po", "grpo")]
    summary = summarize(runs, base)
    res = {
        "budget_s": budget_s,
        "seeds": seeds,
        "lr_grid": list(lr_grid),
        "lr": lr,
        "eval_prompts": len(eval_rows),
        "accuracy_before": base,
        "stage1_s": {s: v[0] for s, v in stage1.items()},
        "stage1_work_s": {s: v[1] for s, v in stage1.items()},
        "lr_tuning": {
            a: [{"lr": r["lr"], "curve_mean": curve_mean(r["curve"])} for r in rs] for a, rs in tuning.items()
        },
        "summary": summary,
        "runs": runs,
    }
    plot_compare(res, OUT / "compare.png")
    _print(res)
    return res


def _print(res: dict) -> None:
    s = res["summary"]
    print(
        f"A*-PO vs GRPO(G={GROUP}), {res['seeds']} seeds, {res['budget_s']:.0f} s each (A*-PO's includes Stage 1), "
        f"{res['eval_prompts']} held-out prompts; lr from {res['lr_grid']} on seed 0: {res['lr']}"
    )
    print(f"  accuracy before {res['accuracy_before']:.3f}, target {s['target_accuracy']:.3f}")
    for algo in ("astar_po", "grpo"):
        a = s[algo]

        def fmt(ms, digits=1):
            return f"{ms[0]:.{digits}f} +- {ms[1]:.{digits}f}" if ms else "-"

        print(
            f"  {algo:9s} reached {a['reached']}/{len(a['seeds'])}; s to target {fmt(a['seconds_to_target_mean_se'])}"
            f" (Stage 1 work only: {fmt(a['work_seconds_to_target_mean_se'])}); KL there "
            f"{fmt(a['kl_at_target_mean_se'], 3)}; final {fmt(a['final_accuracy_mean_se'], 3)}"
        )
    if "time_ratio_astar_over_grpo" in s:
        print(
            f"  time to target, A*-PO / GRPO: {s['time_ratio_astar_over_grpo']:.2f} "
            f"(Stage 1 work only: {s['time_ratio_astar_over_grpo_stage1_work_only']:.2f}; the paper: 0.46)"
        )


def plot_compare(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [i * res["budget_s"] / 200 for i in range(201)]
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(12, 4))
    for algo, color in (("astar_po", "tab:red"), ("grpo", "tab:blue")):
        curves = [r["curve"] for r in res["runs"] if r["algo"] == algo]
        for key, style, label in (("seconds", "-", ""), ("work_seconds", "--", ", Stage 1 work only")):
            if algo == "grpo" and key == "work_seconds":
                continue
            b = band(curves, grid, key)
            m = [x[0] for x in b]
            ax.plot(grid, m, style, color=color, label=("A*-PO" if algo == "astar_po" else f"GRPO (G={GROUP})") + label)
            ax.fill_between(grid, [x[0] - x[1] for x in b], [x[0] + x[1] for x in b], color=color, alpha=0.15)
        for c in curves:
            kx.plot([p["accuracy"] for p in c[1:]], [p["kl"] for p in c[1:]], "o", color=color, ms=3, alpha=0.6)
    ax.axhline(res["summary"]["target_accuracy"], color="gray", ls=":", lw=1, label="target")
    ax.set_xlabel("wall-clock seconds (A*-PO includes Stage 1)")
    ax.set_ylabel(f"held-out greedy accuracy (mean +- s.e., {res['seeds']} seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    kx.set_xlabel("held-out greedy accuracy")
    kx.set_ylabel("KL to the reference (training batches)")
    kx.set_title("KL against accuracy (red: A*-PO, blue: GRPO)")
    kx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


__all__ = [
    "accuracy_at",
    "band",
    "bench_compare",
    "curve_mean",
    "first_reach",
    "mean_se",
    "summarize",
    "target_accuracy",
]
