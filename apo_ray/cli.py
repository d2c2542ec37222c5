"""The `apo-ray` console script and the argument handling shared by jobs/*.py.

    apo-ray vstar --config demo vstar.num_samples=4      # Stage 1
    apo-ray train --config demo train.num_steps=20       # Stage 2
    apo-ray pipeline --config demo [pipeline.stream=true] # Stage 1 then Stage 2 in one driver
    apo-ray eval  --config demo eval.model_path=runs/demo/train/final
    apo-ray demo  --config demo                          # the whole pipeline on this machine
    apo-ray make-tiny-model OUT [--no-sft]
    apo-ray export CHECKPOINT_DIR OUT                    # a training checkpoint -> HF model directory
    apo-ray configs                                      # list shipped configs
    apo-ray show-config --config demo [overrides]        # print the resolved config
    apo-ray plan --config gsm8k_qwen2.5_7b [--gpu-gib 80] # Stage 2's per-GPU memory, by phase

Heavy libraries (torch, vllm, deepspeed, ray) are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from apo_ray.errors import ApoRayError, user_error

JOBS = {
    "vstar": ("apo_ray.vstar", "Stage 1: sample the reference policy, write V* shards"),
    "train": ("apo_ray.train", "Stage 2: A*-PO (or GRPO) with Ray Train + DeepSpeed + vLLM"),
    "pipeline": ("apo_ray.pipeline", "Stage 1 then Stage 2 in one driver, Stage 2 starting up while Stage 1 runs"),
    "eval": ("apo_ray.evaluation", "Evaluate a model: greedy accuracy, pass@k, KL to the reference"),
    "demo": ("apo_ray.demo", "The whole pipeline on this machine, with a report"),
}


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", default=None, help="a shipped config name (e.g. demo) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-5 vstar.num_samples=4")
    return p


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Parse `--config` + overrides, load and validate the config, run the job's `run(cfg)`."""
    module, description = JOBS[name]
    args = job_parser(f"apo-ray {name}", description).parse_intermixed_args(argv)
    from apo_ray.config import load_config
    from apo_ray.runtime import setup_logging

    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        importlib.import_module(module).run(cfg)
    except Exception as e:
        found = user_error(e)  # ours, possibly wrapped by Ray: one clear line, no traceback
        if found is None:
            raise
        print(f"apo-ray {name}: error: {found}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="apo-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (_, desc) in JOBS.items():
        sub.add_parser(name, help=desc, add_help=False)
    tiny = sub.add_parser("make-tiny-model", help="build the project's tiny Qwen2 model + tokenizer")
    tiny.add_argument("out")
    tiny.add_argument("--no-sft", action="store_true", help="random weights (no warm-start SFT)")
    exp = sub.add_parser("export", help="write a HF model directory from a training checkpoint")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    sub.add_parser("configs", help="list shipped configs")
    sub.add_parser("show-config", help="print the resolved config", add_help=False)
    sub.add_parser("plan", help="per-GPU memory plan of Stage 2 (learner + colocated vLLM)", add_help=False)
    if argv and argv[0] in JOBS:
        return run_job(argv[0], argv[1:])
    if argv and argv[0] == "show-config":
        from apo_ray.config import load_config, to_yaml

        args = job_parser("apo-ray show-config", "print the resolved config").parse_intermixed_args(argv[1:])
        try:
            print(to_yaml(load_config(args.config, args.overrides)), end="")
        except ApoRayError as e:
            print(f"apo-ray show-config: error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv and argv[0] == "plan":
        return _memory_plan(argv[1:])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _tool(args)
    except ApoRayError as e:
        print(f"apo-ray {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _memory_plan(argv: list[str]) -> int:
    """`apo-ray plan --config NAME [--gpu-gib G] [--dtype D] [overrides]`: exit 0 if it fits, 1 if not, 2 on errors."""
    p = job_parser("apo-ray plan", "per-GPU memory plan of Stage 2: learner + colocated vLLM, by phase")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU memory (default resources.gpu_memory_gib, else 80)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="learner weights (GPU: bf16)")
    args = p.parse_intermixed_args(argv)
    try:
        from apo_ray.config import load_config
        from apo_ray.memory import plan_memory, shape_of
        from apo_ray.model import resolve_model

        cfg = load_config(args.config, args.overrides)
        gpu = args.gpu_gib or cfg.resources.gpu_memory_gib or 80.0
        plan = plan_memory(cfg, shape_of(resolve_model(cfg.model.path)), gpu, args.dtype)
    except ApoRayError as e:
        print(f"apo-ray plan: error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0 if plan.fits else 1


def _tool(args: argparse.Namespace) -> None:
    if args.cmd == "make-tiny-model":
        from apo_ray.model.tiny import build_tiny_model

        print(build_tiny_model(args.out, sft=not args.no_sft))
    elif args.cmd == "export":
        from apo_ray.train.checkpoint import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.out))
    elif args.cmd == "configs":
        from apo_ray.config import shipped_configs

        print("\n".join(shipped_configs()))


if __name__ == "__main__":
    sys.exit(main())
