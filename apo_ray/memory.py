"""A memory planner for Stage 2 on GPUs: the per-GPU peak of a colocated learner + vLLM replica.

    apo-ray plan --config gsm8k_qwen2.5_7b [--gpu-gib 80] [overrides]

Stage 2 colocates, on each GPU, one DeepSpeed learner rank and one vLLM replica. The GPU goes
through three phases per step, and the peak is the largest of them:

- generate: the learner's resident state + vLLM at ``engine.gpu_memory_utilization`` x GPU
  (vLLM allocates that share up front: weights, activations, KV cache);
- train: the learner's resident state + activations and logits of one micro-batch + what a
  sleeping vLLM keeps (level 1 and 2 free weights and KV cache; its CUDA context and graphs stay);
- sync: the learner's resident state + vLLM's weights (woken alone, `recipe.sync`) + one bucket.

Formulas (bytes, P parameters, W learners, ZeRO stage z, mixed precision as DeepSpeed runs it;
Rajbhandari et al., "ZeRO", 2020, sec. 3, and DeepSpeed's memory docs):

- weights in the model dtype (2 bytes in bf16, 4 in fp32): 2P, divided by W when z = 3;
- fp32 master weights (bf16 only) 4P and Adam moments 8P: divided by W when z >= 1;
- gradients: fp32 accumulation (`data_types.grad_accum_dtype`) 4P, divided by W when z >= 2,
  plus the model-dtype gradient of the backward (2P, or reduce-scatter buckets when z >= 2);
- the frozen reference: the model-dtype weights again (divided by W when z = 3);
- activations of one micro-batch of b sequences of s = max_prompt_tokens + max_tokens tokens,
  with fused (SDPA/flash) attention: 34·b·s·h bytes per layer in 16 bits (Korthikanti et al.,
  "Reducing Activation Recomputation in Large Transformer Models", 2022, eq. 2 without the
  attention-score term), for all L layers; with gradient checkpointing 2·b·s·h per layer (the
  layer inputs) plus one layer's 34·b·s·h;
- logits: b·s·V values in the model dtype + a float32 log-softmax + its float32 gradient;
- a CUDA context and allocator slack of `OVERHEAD_GIB` per process (measured figures for
  PyTorch 2.x are 0.5-1.5 GiB); a sleeping vLLM keeps `VLLM_ASLEEP_GIB`.

The figures are estimates to refuse what cannot fit, not a promise that what passes will:
fragmentation, NCCL buffers and long-tail sequence lengths add to them. A test checks the
resident-state formulas against the tensors of the real CPU learner (tests/unit/test_memory.py
and tests/integration/test_learner.py); GPU measurements are still to be made (see README).
"""

from __future__ import annotations

from dataclasses import dataclass

from apo_ray.config import Config

GIB = 2**30
OVERHEAD_GIB = 1.5  # CUDA context + allocator slack per process (learner; vLLM's is inside its share)
VLLM_ASLEEP_GIB = 1.0  # what a sleeping vLLM keeps on the GPU (context, CUDA graphs)
BUCKET_BYTES = 512 * 2**20  # one weight-sync bucket (apo_ray.rollout.weight_sync.DEFAULT_BUCKET_BYTES)
HEADROOM = 0.95  # plan to at most this fraction of the GPU


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer (Qwen2 / Llama layout)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def params(self) -> int:
        """Parameter count: embeddings, per layer q/k/v (with biases, as Qwen2) + o + gated MLP + 2 norms, final norm, lm_head."""
        h, d = self.hidden, self.hidden // self.heads
        kv = self.kv_heads * d
        layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


# Shapes of the models the shipped configs name (from their public config.json), so that the
# planner answers without downloading; any other model is read from its config.json.
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B": ModelShape(896, 24, 4864, 151936, 14, 2, True),
    "Qwen/Qwen2.5-1.5B": ModelShape(1536, 28, 8960, 151936, 12, 2, True),
    "Qwen/Qwen2.5-3B": ModelShape(2048, 36, 11008, 151936, 16, 2, True),
    "Qwen/Qwen2.5-7B": ModelShape(3584, 28, 18944, 152064, 28, 4, False),
}


def shape_of(model_path: str) -> ModelShape:
    """The shape of a known hub id, or read from a local model's config.json (transformers)."""
    if model_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[model_path]
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    return ModelShape(
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
        heads=c.num_attention_heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


def learner_bytes(shape: ModelShape, cfg: Config, dtype: str) -> dict[str, float]:
    """Per-GPU bytes of one learner rank: its resident state (kept across steps) and one micro-batch's work."""
    t, s = cfg.train, cfg.sampling
    P, W, z = shape.params, t.num_learners, t.zero_stage
    w = 2 if dtype in ("bfloat16", "float16") else 4
    shard3 = W if z == 3 else 1
    out = {
        "weights": w * P / shard3,
        "master_weights": (4 * P / (W if z >= 1 else 1)) if w == 2 else 0.0,
        "adam_moments": 8 * P / (W if z >= 1 else 1),
        "gradients": 4 * P / (W if z >= 2 else 1) + (w * P if z < 2 and w == 2 else 0.0),
        "reference": w * P / shard3,
    }
    b, seq, h, L = t.micro_batch_size, s.max_prompt_tokens + s.max_tokens, shape.hidden, shape.layers
    per_layer = 34 * b * seq * h * (w / 2)  # 34 bytes per element in 16 bits
    if t.gradient_checkpointing:
        out["activations"] = 2 * b * seq * h * (w / 2) * L + per_layer
    else:
        out["activations"] = per_layer * L
    out["logits"] = b * seq * shape.vocab * (w + 4 + 4)
    return out


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU estimate of a colocated Stage 2 step, in GiB."""

    gpu_gib: float
    params_b: float  # billions
    learner: dict  # component -> GiB
    resident_gib: float  # the learner's state kept across phases (incl. overhead)
    phases: dict  # generate / train / sync -> GiB
    peak_gib: float
    fits: bool
    advice: str

    def table(self) -> str:
        lines = [f"model: {self.params_b:.2f} B parameters; per GPU of {self.gpu_gib:g} GiB:"]
        lines += [f"  learner {k:<16} {v:8.2f} GiB" for k, v in self.learner.items()]
        lines.append(f"  learner resident       {self.resident_gib:8.2f} GiB (state + {OVERHEAD_GIB} GiB context)")
        lines += [f"  phase {k:<18} {v:8.2f} GiB" for k, v in self.phases.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  peak {self.peak_gib:.2f} GiB of {HEADROOM * self.gpu_gib:.1f} usable: {verdict}")
        if self.advice:
            lines.append(f"  {self.advice}")
        return "\n".join(lines)


def plan_memory(cfg: Config, shape: ModelShape, gpu_gib: float, dtype: str = "bfloat16") -> MemoryPlan:
    """The per-GPU peak of a colocated Stage 2 step and whether it fits `gpu_gib` (see the module doc)."""
    parts = learner_bytes(shape, cfg, dtype)
    state = ("weights", "master_weights", "adam_moments", "gradients", "reference")
    resident = sum(parts[k] for k in state) / GIB + OVERHEAD_GIB
    work = (parts["activations"] + parts["logits"]) / GIB
    w = 2 if dtype in ("bfloat16", "float16") else 4
    vllm_weights = w * shape.params / cfg.engine.tensor_parallel_size / GIB
    if cfg.train.placement == "separate":  # vLLM has GPUs of its own: the learner's GPU holds the learner
        phases = {"train": resident + work, "sync": resident + BUCKET_BYTES / GIB}
    else:
        phases = {
            "generate": resident + cfg.engine.gpu_memory_utilization * gpu_gib,
            "train": resident + work + (VLLM_ASLEEP_GIB if cfg.train.sleep_between_phases else vllm_weights),
            "sync": resident + vllm_weights + BUCKET_BYTES / GIB,
        }
    peak = max(phases.values())
    fits = peak <= HEADROOM * gpu_gib
    advice = ""
    if not fits:
        worst = max(phases, key=phases.get)
        advice = {
            "generate": "lower engine.gpu_memory_utilization, or raise train.zero_stage / train.num_learners",
            "train": "lower train.micro_batch_size, set train.gradient_checkpointing=true, or raise train.zero_stage",
            "sync": "raise train.zero_stage or train.num_learners (less learner state per GPU)",
        }[worst]
        advice = f"the {worst} phase is the peak: {advice}"
    return MemoryPlan(
        gpu_gib=gpu_gib,
        params_b=shape.params / 1e9,
        learner={k: v / GIB for k, v in parts.items()},
        resident_gib=resident,
        phases=phases,
        peak_gib=peak,
        fits=fits,
        advice=advice,
    )


def check_fits(cfg: Config, model_path: str, gpu_gib: float, dtype: str) -> MemoryPlan:
    """`plan_memory` for Stage 2's start-up; ConfigError naming the keys to change when it cannot fit."""
    from apo_ray.errors import ConfigError

    plan = plan_memory(cfg, shape_of(model_path), gpu_gib, dtype)
    if not plan.fits:
        raise ConfigError(
            f"config key 'train.micro_batch_size': Stage 2 needs ~{plan.peak_gib:.1f} GiB per GPU "
            f"(generate {plan.phases['generate']:.1f}, train {plan.phases['train']:.1f}, sync "
            f"{plan.phases['sync']:.1f}) on {gpu_gib:g} GiB GPUs; {plan.advice} "
            "(apo-ray plan prints the breakdown; resources.gpu_memory_gib overrides the GPU size)"
        )
    return plan
