"""The whole A*-PO pipeline on one machine, with a report a person would rather read than logs.

    make demo                       # = python jobs/demo.py --config demo
    python jobs/demo.py --config demo train.num_steps=50

On an embedded local Ray (no GPU needed): build (or reuse) the warm-started tiny model,
evaluate it on held-out arith prompts, run Stage 1 (V*) and Stage 2 (A*-PO) as the one-command
pipeline (`apo_ray.pipeline`: Stage 2 starts up while Stage 1 samples), evaluate again, then
write `<run>/summary.json` and `<run>/report.png` and print a table, where <run> is the parent
of train.output_dir (runs/demo for the demo config). Every run starts fresh: a previous demo's
V* shards and Stage 2 output are replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from apo_ray.config import Config
from apo_ray.storage import strict_json

log = logging.getLogger("apo_ray.demo")


def _remove_previous_stage2(out: Path) -> None:
    """Delete an earlier Stage 2 output at `out` (recognised by its config.yaml and metrics.jsonl)."""
    if (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file():
        log.info("demo: removing the previous demo's Stage 2 output %s (a demo starts from step 0)", out)
        shutil.rmtree(out)


def run(cfg: Config) -> dict:
    from apo_ray import evaluation, pipeline
    from apo_ray.data import load_prompts
    from apo_ray.model import resolve_model
    from apo_ray.runtime import init_ray

    run_dir = Path(cfg.train.output_dir).expanduser().resolve().parent
    run_dir.mkdir(parents=True, exist_ok=True)
    # A demo is one fresh run: a previous demo's V* would be reused (or refused, if the model
    # changed since), its Stage 2 resumed at the last step, and the timings would mean nothing.
    cfg = dataclasses.replace(cfg, vstar=dataclasses.replace(cfg.vstar, overwrite=True))
    _remove_previous_stage2(Path(cfg.train.output_dir).expanduser().resolve())
    seconds: dict[str, float] = {}
    t0 = time.time()

    t = time.time()
    model_path = resolve_model(cfg.model.path)
    seconds["model"] = time.time() - t
    init_ray(cfg.resources)
    eval_rows = load_prompts(cfg.data, "eval").rows

    t = time.time()
    before = evaluation.evaluate(model_path, eval_rows, cfg, ref_path=model_path)
    seconds["eval_before"] = time.time() - t

    t = time.time()
    both = pipeline.run(cfg)
    stage1, stage2, timeline = both["stage1"], both["stage2"], both["timeline"]
    seconds["pipeline"] = time.time() - t
    seconds["stage1"] = timeline["stage1_s"]  # Stage 2 started up meanwhile
    seconds["stage2"] = seconds["pipeline"] - seconds["stage1"]  # after Stage 1

    t = time.time()
    after = evaluation.evaluate(stage2["final_model"], eval_rows, cfg, ref_path=model_path)
    seconds["eval_after"] = time.time() - t
    seconds["total"] = time.time() - t0

    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "accuracy_gain": after["accuracy"] - before["accuracy"],
        "kl_to_ref": after["kl_to_ref"],
        "seconds": seconds["total"],
        "stage_seconds": seconds,
        "num_eval_prompts": len(eval_rows),
        "train_steps": stage2["steps"],
        "stage1": {k: stage1[k] for k in ("counts", "reward_mean", "wall_time_s", "generated_tokens_per_s")},
        "pipeline": timeline,
        "model": model_path,
        "final_model": stage2["final_model"],
    }
    (run_dir / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    plot_report(
        Path(cfg.train.output_dir).expanduser().resolve() / "metrics.jsonl",
        run_dir / "report.png",
        train_start_s=timeline["first_step_s"] or seconds["stage1"],
        before=before["accuracy"],
        after=after["accuracy"],
    )
    print(format_table(summary))
    print(f"\nwrote {run_dir / 'summary.json'} and {run_dir / 'report.png'}")
    return summary


def format_table(s: dict) -> str:
    st = s["stage_seconds"]
    lines = [
        "A*-PO demo",
        f"  greedy accuracy (held-out, {s['num_eval_prompts']} prompts): "
        f"{s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} ({100 * s['accuracy_gain']:+.1f} points)",
        f"  KL(pi || pi_ref) after training:  {s['kl_to_ref']:.4f} nats/sequence",
        f"  Stage 2 steps: {s['train_steps']}",
        "  wall time (s): "
        + ", ".join(f"{k} {st[k]:.0f}" for k in ("model", "eval_before", "stage1", "stage2", "eval_after", "total"))
        + f" (Stage 1 + Stage 2 in one pipeline: {st['pipeline']:.0f})",
    ]
    return "\n".join(lines)


def plot_report(metrics_path: Path, out: Path, *, train_start_s: float, before: float, after: float) -> None:
    """Reward and held-out accuracy against step and against the pipeline's wall-clock seconds (Stage 1
    counted: training starts `train_start_s` after the pipeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apo_ray.metrics import read_metrics

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    wall = [train_start_s + r["time_s"] for r in rows]
    reward = [r["reward_mean"] for r in rows]
    ev = [r for r in rows if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    acc = [before] + [r["eval_accuracy"] for r in ev]  # the accuracy curve starts at the warm-started model
    for ax, xs, ex, label in (
        (axes[0], steps, [0] + [r["step"] for r in ev], "step"),
        (
            axes[1],
            wall,
            [train_start_s] + [train_start_s + r["time_s"] for r in ev],
            "wall-clock seconds (Stage 1 + Stage 2)",
        ),
    ):
        ax.plot(xs, reward, color="tab:blue", alpha=0.35, label="sampled reward (batch mean)")
        ax.plot(xs, _smooth(reward), color="tab:blue", label="sampled reward (smoothed)")
        ax.plot(ex, acc, "o-", color="tab:red", label="held-out greedy accuracy")
        ax.axhline(before, color="gray", ls="--", lw=1, label=f"accuracy before ({before:.2f})")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_title("A*-PO on arith: reward and accuracy by step")
    axes[1].set_title(f"... by wall-clock (final accuracy {after:.2f})")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out
