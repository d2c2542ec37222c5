"""Stage 2 learner: one DeepSpeed data-parallel rank that regresses the policy onto A*-PO targets.

A plain class, no Ray: the Stage 2 recipe (apo_ray/train/recipe.py) builds one per Ray Train worker,
where torch.distributed is already initialised (gloo on CPU, nccl on GPU), and calls, per step,
``train_minibatch`` on this rank's shard of each mini-batch, ``named_weights`` to push weights into
the rollout engine, and ``save_checkpoint`` / ``load_checkpoint`` for fault tolerance.

Alignment convention (one for every (B, T) tensor here): ``input_ids_BT`` is prompt + response,
right-padded; the logits at position t predict the token at t + 1, so ``logp_BT[:, t]`` is
log pi(input_ids[t] | input_ids[:t]) for t >= 1 and ``logp_BT[:, 0] = 0``. ``response_mask_BT`` is 1
on the positions of response tokens (the *predicted* tokens), ``engine_logp_BT`` holds the rollout
engine's log-probs on the same positions.

Normalisers (global counts, computed here and passed to the losses): DeepSpeed divides each micro-batch loss by the gradient-accumulation
steps G and averages gradients over the W ranks. The loss of a micro-batch is therefore divided by
``M / (W * G)``, M = sequences (A*-PO) or response tokens (GRPO) in the whole optimizer step, so the
update is the gradient of the mean over all M.

Choices the paper leaves open, and departures:
- Reference policy placement: a second copy of the initial weights on the same device, frozen
  (eval, requires_grad False), in the model dtype. With ZeRO stages 0-2 it is a plain
  ``nn.Module`` (replicated, like the policy's parameters); with ZeRO-3 it is wrapped in a second
  DeepSpeed engine without optimizer (stage 3: sharded like the policy, gathered layer by layer
  in its forward). The paper does not say where its reference lives.
- AdamW weight decay applies to every parameter (DeepSpeed's config optimizer; no bias/norm
  exclusion). Warm-up, when asked for, is linear from lr / warmup_steps to lr.
- Each optimizer step takes exactly ``seqs_per_optimizer_step / W`` sequences per rank; the loop
  pads or trims mini-batches, the learner raises otherwise.

Run: not a script; see tests/integration/test_learner.py for a one-process gloo set-up.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import TrainConfig
from apo_ray.train.dist import global_sum, max_over_ranks, sum_over_ranks
from apo_ray.train.plan import check_bf16_accumulation

# Tokenizer files copied next to saved weights, so a saved dir is a full HF / vLLM model dir.
_TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.jinja")
_CLIENT_KEY = "apo_ray"


# ---------------------------------------------------------------- batch


def _as_float_tensor(values: Any, n: int, name: str) -> torch.Tensor:
    if values is None:
        return torch.zeros(n, dtype=torch.float32)
    out = torch.as_tensor(values, dtype=torch.float32).flatten()
    if out.numel() != n:
        raise ValueError(f"{name}: expected {n} values, got {out.numel()}")
    return out


@dataclass
class RolloutBatch:
    """One batch of sampled sequences on the CPU (see the module docstring for the alignment)."""

    input_ids_BT: torch.Tensor  # long, prompt + response, right-padded
    attention_mask_BT: torch.Tensor  # long, 1 on real tokens
    response_mask_BT: torch.Tensor  # float, 1 on response-token positions that count
    reward_B: torch.Tensor  # float
    vstar_B: torch.Tensor  # float (A*-PO), zeros for GRPO
    adv_B: torch.Tensor  # float, GRPO advantages (zeros for A*-PO)
    engine_logp_BT: torch.Tensor  # float, engine log-probs on response positions, 0 elsewhere

    @staticmethod
    def from_sequences(
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        engine_logps: Sequence[Sequence[float]] | None,
        reward: Any,
        vstar: Any = None,
        adv: Any = None,
        pad_id: int = 0,
    ) -> RolloutBatch:
        """Pad prompt + response token lists into (B, T) tensors.

        Args:
            prompt_ids, response_ids: token ids per sequence; prompts must be non-empty
                (position 0 has no log-prob).
            engine_logps: the rollout engine's log-prob of each response token (same lengths as
                response_ids), or None for zeros.
            reward, vstar, adv: one float per sequence (lists or tensors); None gives zeros.
            pad_id: id written in padding (masked out everywhere).

        Returns:
            A RolloutBatch whose response token j of sequence b sits at position len(prompt_b) + j.
        """
        n = len(prompt_ids)
        if len(response_ids) != n or (engine_logps is not None and len(engine_logps) != n):
            raise ValueError("prompt_ids, response_ids and engine_logps must have one entry per sequence")
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        T = max(lengths, default=1)
        # Rows built as lists, one tensor per field: per-row slice assignments (5 small tensor ops
        # a row) took 0.94 ms on a 64-sequence demo batch, this 0.28 ms (measured).
        ids, attention, resp_mask, engine_logp = [], [], [], []
        for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if len(p) == 0:
                raise ValueError(f"sequence {b}: empty prompt (the first token has no log-prob)")
            P, R, pad = len(p), len(r), T - lengths[b]
            ids.append([*p, *r] + [pad_id] * pad)
            attention.append([1] * (P + R) + [0] * pad)
            resp_mask.append([0.0] * P + [1.0] * R + [0.0] * pad)
            if engine_logps is not None:
                if len(engine_logps[b]) != R:
                    raise ValueError(f"sequence {b}: {len(engine_logps[b])} engine log-probs for {R} tokens")
                engine_logp.append([0.0] * P + [*engine_logps[b]] + [0.0] * pad)

        def table(rows: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(rows, dtype=dtype) if rows else torch.zeros((n, T), dtype=dtype)

        input_ids = table(ids, torch.long)
        attention = table(attention, torch.long)
        resp_mask = table(resp_mask, torch.float32)
        engine_logp = table(engine_logp, torch.float32)
        return RolloutBatch(
            input_ids_BT=input_ids,
            attention_mask_BT=attention,
            response_mask_BT=resp_mask,
            reward_B=_as_float_tensor(reward, n, "reward"),
            vstar_B=_as_float_tensor(vstar, n, "vstar"),
            adv_B=_as_float_tensor(adv, n, "adv"),
            engine_logp_BT=engine_logp,
        )

    def slice(self, idx: Any) -> RolloutBatch:
        """Rows `idx` (a slice, list or index tensor) of every field."""
        if isinstance(idx, list):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return RolloutBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def trimmed(self) -> RolloutBatch:
        """Drop trailing columns that are padding in every row (saves compute on short batches)."""
        T = max(int(self.attention_mask_BT.sum(dim=1).max().item()), 1) if len(self) else 1
        return RolloutBatch(**{f.name: _trim(getattr(self, f.name), T) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.input_ids_BT.shape[0])


def _trim(t: torch.Tensor, T: int) -> torch.Tensor:
    return t[:, :T] if t.dim() == 2 else t


def aligned_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(input_ids[t] | < t) at position t (float32), 0 at t = 0: the module's alignment."""
    from apo_ray.algo import token_logprobs

    logp_BT1 = token_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:], temperature=temperature)
    return torch.nn.functional.pad(logp_BT1, (1, 0))


# Elements (B x T x V) of the float32 softmax the entropy statistic may hold at once: 64 MiB. A
# 7B-size row (T x V ~ 2e8) goes alone, as before; the demo's whole micro-batch (~2e5) goes in one
# call instead of 64 (one per row), with the same values bit for bit.
STAT_CHUNK_ELEMS = 2**24


def stat_rows_per_chunk(shape_BTV: Sequence[int], max_elems: int = STAT_CHUNK_ELEMS) -> int:
    """Rows of a (B, T, V) logits tensor per chunk for a statistic's float32 copy (at least 1)."""
    _, T, V = shape_BTV
    return max(1, max_elems // max(T * V, 1))


# ---------------------------------------------------------------- learner


def _init_deepspeed_dist(device: str) -> None:
    """Let DeepSpeed's comm layer wrap the torch.distributed group the caller initialised."""
    import deepspeed

    if not torch.distributed.is_initialized():
        raise RuntimeError("Learner needs torch.distributed initialised (Ray Train does it; tests use gloo)")
    deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")


def _load_hf_model(model_path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # Loaded in float32: DeepSpeed's bf16 mode casts the policy and keeps fp32 master weights.
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


class Learner:
    """One data-parallel rank of the Stage 2 policy (DeepSpeed engine + frozen reference).

    Args:
        model_path: HF model dir (policy and reference start from it; pass the same path when
            resuming: checkpoints hold the policy, the reference is re-read from here).
        cfg: lr, weight_decay, grad_clip, warmup_steps, zero_stage, micro_batch_size, beta2,
            entropy_coef, clip_eps, kl_coef are read (seeding is the caller's: nothing here is random).
            torch.distributed must be initialised and LOCAL_RANK set (Ray Train does both).
        world_size, rank: of the data-parallel group (must match torch.distributed).
        device: "cpu" or "cuda".
        dtype: "float32" or "bfloat16" (DeepSpeed bf16 mode, fp32 master weights).
        seqs_per_optimizer_step: sequences of one optimizer step over all ranks; with
            micro_batch_size it fixes the gradient-accumulation steps.
        temperature: sampling temperature of the rollouts (log-probs are of pi / temperature).
    """

    CLIP_IN_TORCH = True  # ZeRO-0: clip here, not in DeepSpeed (`clips_itself`); tests compare the two
    SKIP_LONE_ALLREDUCE = True  # one fp32 ZeRO-0 rank: no gradient all-reduce (`reduces_alone`); tests compare

    def __init__(
        self,
        model_path: str,
        cfg: TrainConfig,
        *,
        world_size: int,
        rank: int,
        device: str = "cpu",
        dtype: str = "float32",
        seqs_per_optimizer_step: int,
        temperature: float = 1.0,
    ) -> None:
        import deepspeed

        micro = cfg.micro_batch_size
        if seqs_per_optimizer_step % (world_size * micro):
            raise ValueError(
                f"seqs_per_optimizer_step={seqs_per_optimizer_step} is not a multiple of "
                f"world_size ({world_size}) x micro_batch_size ({micro})"
            )
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        check_bf16_accumulation(dtype, cfg.zero_stage)
        _init_deepspeed_dist(device)
        if torch.distributed.get_world_size() != world_size or torch.distributed.get_rank() != rank:
            raise ValueError(
                f"world_size/rank {world_size}/{rank} disagree with torch.distributed "
                f"{torch.distributed.get_world_size()}/{torch.distributed.get_rank()}"
            )
        self.cfg, self.world_size, self.rank = cfg, world_size, rank
        self.model_path, self.temperature, self.dtype = model_path, temperature, dtype
        self.micro = micro
        self.gas = seqs_per_optimizer_step // (world_size * micro)
        # ZeRO-0 (always fp32): the gradients are clipped here, with the norm the stats take anyway
        # and torch's foreach kernels, not by DeepSpeed's per-parameter loop and its all-reduce of
        # a norm every rank already has (0.5 ms of a 23 ms demo update, measured). The same formula
        # (max_norm / (norm + 1e-6), at most 1). With ZeRO >= 1 DeepSpeed's optimizer clips.
        self.clips_itself = self.CLIP_IN_TORCH and cfg.zero_stage == 0 and dtype == "float32" and cfg.grad_clip > 0

        policy = _load_hf_model(model_path)
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, *_ = deepspeed.initialize(
            model=policy,
            model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=self._ds_config(),
            lr_scheduler=self._warmup_scheduler if cfg.warmup_steps > 0 else None,
        )
        # One fp32 ZeRO-0 rank: DeepSpeed's gradient all-reduce at each boundary flattens every
        # gradient into a bucket, all-reduces it with itself and divides by 1, then copies it back:
        # the same bits, 1.4-2.1 ms of a ~60 ms demo update (measured, alternated). It is left out.
        self.reduces_alone = self.SKIP_LONE_ALLREDUCE and world_size == 1 and cfg.zero_stage == 0 and dtype == "float32"
        if self.reduces_alone:
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device
        self.ref = self._build_reference()

    # ------------------------------------------------------------ set-up

    def _ds_config(self) -> dict:
        c = self.cfg
        return {
            "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": self.gas,
            "train_batch_size": self.micro * self.gas * self.world_size,
            "optimizer": {
                "type": "AdamW",
                # torch_adam: torch's AdamW, no FusedAdam / CPUAdam build at start-up.
                "params": {"lr": c.lr, "weight_decay": c.weight_decay, "betas": [0.9, 0.999], "torch_adam": True},
            },
            "gradient_clipping": 0.0 if self.clips_itself else c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            # With ZeRO >= 1 DeepSpeed accumulates gradients in the model dtype unless told
            # otherwise: 8-32 bf16 micro-batch sums lose ~3 significant digits. ZeRO-0 + bf16
            # cannot accumulate in fp32 and is refused (`check_bf16_accumulation`).
            "data_types": {"grad_accum_dtype": "fp32"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _warmup_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = self.cfg.warmup_steps
        # Step k (0-based) runs at lr * (k + 1) / warmup, then lr: the first step is not wasted at lr 0.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))

    def _build_reference(self) -> Any:
        import deepspeed

        ref = _load_hf_model(self.model_path)
        ref.requires_grad_(False)
        ref.eval()
        if self.cfg.zero_stage == 3:
            config = {
                "train_micro_batch_size_per_gpu": self.micro,
                "gradient_accumulation_steps": 1,
                "train_batch_size": self.micro * self.world_size,
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": self.dtype == "bfloat16"},
                "steps_per_print": 10**9,
            }
            engine, *_ = deepspeed.initialize(model=ref, config=config)
            engine.eval()
            return engine
        # Cast the parameters only, as DeepSpeed does for the policy: buffers such as the rotary
        # inv_freq stay float32 (in bf16 the rotary angles drift by up to ~1.5 rad at position 1280,
        # so log pi - log pi_ref would not be 0 at step 0).
        model_dtype = next(self.engine.module.parameters()).dtype
        ref.to(device=self.device)
        for param in ref.parameters():
            param.data = param.data.to(model_dtype)
        return ref

    # ------------------------------------------------------------ forward passes

    def _forward_logprobs(self, model: Any, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp_BT, logits_BTV) of a trimmed, on-device micro-batch."""
        out = model(input_ids=mb.input_ids_BT, attention_mask=mb.attention_mask_BT, use_cache=False)
        return aligned_logprobs(out.logits, mb.input_ids_BT, self.temperature), out.logits

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, *, ref: bool) -> torch.Tensor:
        """Log-probs (B, T) on the CPU, float32, aligned with response_mask_BT; no gradients.

        With ZeRO-3 every rank must call this with the same number of micro-batches.
        """
        model = self.ref if ref else self.engine.module
        was_training = model.training
        model.eval()
        out = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        try:
            for start in range(0, len(batch), self.micro):
                mb = batch.slice(slice(start, start + self.micro)).trimmed().to(self.device)
                logp_BT, _ = self._forward_logprobs(model, mb)
                out[start : start + len(mb), : logp_BT.shape[1]] = logp_BT.float().cpu()
        finally:
            model.train(was_training)
        return out * (batch.attention_mask_BT > 0)

    # ------------------------------------------------------------ training

    def train_minibatch(
        self,
        mb: RolloutBatch,
        *,
        algo: str,
        normalizer_seqs: int,
        old_logp_BT: torch.Tensor | None = None,
        num_tokens: int | None = None,
    ) -> dict[str, float]:
        """This rank's shard of one optimizer step (a collective: every rank calls it).

        Args:
            mb: exactly gas x micro_batch_size sequences (this rank's shard).
            algo: "astar_po" or "grpo".
            normalizer_seqs: sequences in the whole optimizer step, all ranks (A*-PO mean).
            old_logp_BT: GRPO only, log-probs of the sampling policy (B, T), e.g. from
                ``logprobs(batch, ref=False)`` before the first mini-batch; None: the current
                policy's detached log-probs (ratio 1, exact for the first mini-batch).
            num_tokens: response tokens in the whole optimizer step, all ranks (GRPO token mean,
                the entropy bonus's mean in both algorithms); None: all-reduced here.

        Returns:
            Global stats (same on every rank): loss, kl (mean sequence log pi/pi_ref), logprob_gap
            (mean |sum_t engine logp - sum_t learner logp|, before this step) and its max, entropy
            (token mean), response_len, grad_norm, lr, the loss's own stats, time_s.
        """
        if algo not in ("astar_po", "grpo"):
            raise ValueError(f"algo must be astar_po or grpo, got {algo!r}")
        if len(mb) != self.gas * self.micro:
            raise ValueError(
                f"mini-batch shard has {len(mb)} sequences, expected gas x micro = {self.gas * self.micro}"
            )
        t0 = time.perf_counter()
        if num_tokens is None:
            num_tokens = int(global_sum(float(mb.response_mask_BT.sum())))
        scale = self.world_size * self.gas  # DeepSpeed divides by both (1/G in backward, mean over W)
        self.engine.train()
        lr = self.current_lr()
        acc: dict[str, float] = {}
        gap_max = 0.0
        for i in range(self.gas):
            micro = mb.slice(slice(i * self.micro, (i + 1) * self.micro))
            old = None if old_logp_BT is None else old_logp_BT[i * self.micro : (i + 1) * self.micro]
            gap_max = max(
                gap_max, self._train_micro(micro, old, algo, normalizer_seqs / scale, num_tokens / scale, acc)
            )
            if i == self.gas - 1:
                local_norm = self._local_grad_norm()  # before step() frees the gradients
            self.engine.step()  # the optimizer steps at the accumulation boundary (the last micro-batch)
        return self._finish_stats(acc, gap_max, scale, lr, local_norm, time.perf_counter() - t0)

    def _train_micro(
        self,
        micro: RolloutBatch,
        old_logp_BT: torch.Tensor | None,
        algo: str,
        seq_norm: float,
        tok_norm: float,
        acc: dict[str, float],
    ) -> float:
        """Forward + backward of one micro-batch; adds local sums to `acc`, returns its max logprob gap."""
        from apo_ray.algo import astar_po_loss, grpo_loss, sequence_log_ratio, token_entropy

        c = self.cfg
        T = max(int(micro.attention_mask_BT.sum(dim=1).max().item()), 1)
        mb = micro.trimmed().to(self.device)
        logp_BT, logits_BTV = self._forward_logprobs(self.engine, mb)
        with torch.no_grad():
            ref_logp_BT, _ = self._forward_logprobs(self.ref, mb)
        mask_BT = mb.response_mask_BT
        if c.entropy_coef > 0:
            entropy_BT = token_entropy(logits_BTV[:, :-1], temperature=self.temperature)
        else:
            with torch.no_grad():  # stats only: rows in chunks, to bound the float32 copy
                chunks = logits_BTV.split(stat_rows_per_chunk(logits_BTV.shape))
                entropy_BT = torch.cat([token_entropy(rows[:, :-1], self.temperature) for rows in chunks])
        entropy_BT = torch.nn.functional.pad(entropy_BT, (1, 0))
        # train.entropy_coef applies to both algorithms: a token-mean bonus over the step's tokens.
        bonus = {"entropy_BT": entropy_BT, "entropy_coef": c.entropy_coef, "num_tokens": tok_norm}
        if algo == "astar_po":
            loss, stats = astar_po_loss(
                logp_BT, ref_logp_BT, mask_BT, mb.reward_B, mb.vstar_B, c.beta2, normalizer=seq_norm, **bonus
            )
            weight = float(len(mb))
        else:
            old = logp_BT.detach() if old_logp_BT is None else old_logp_BT[:, :T].to(self.device)
            loss, stats = grpo_loss(logp_BT, old, ref_logp_BT, mask_BT, mb.adv_B, c.clip_eps, c.kl_coef, **bonus)
            weight = float(mask_BT.sum())
        self.engine.backward(loss)

        with torch.no_grad():
            mask = mask_BT.bool()
            seq_logp_B = torch.where(mask, logp_BT.detach(), 0.0).sum(-1)
            gap_B = (torch.where(mask, mb.engine_logp_BT, 0.0).sum(-1) - seq_logp_B).abs()
            sums = {
                "loss": float(loss.detach()),
                "kl": float(sequence_log_ratio(logp_BT.detach(), ref_logp_BT, mask).sum()),
                "logprob_gap": float(gap_B.sum()),
                "entropy": float(torch.where(mask, entropy_BT.detach(), 0.0).sum()),
                "seqs": float(len(mb)),
                "tokens": float(mask.sum()),
                "algo_weight": weight,
            }
            sums.update({f"algo/{k}": v * weight for k, v in stats.items() if k != "entropy"})
        for k, v in sums.items():
            acc[k] = acc.get(k, 0.0) + v
        return float(gap_B.max()) if len(gap_B) else 0.0

    def _finish_stats(
        self, acc: dict[str, float], gap_max: float, scale: int, lr: float, local_norm: float, seconds: float
    ) -> dict:
        g = sum_over_ranks(acc)
        gmax = max_over_ranks(gap_max)
        seqs, tokens = g["seqs"], max(g["tokens"], 1.0)
        out = {
            "loss": g["loss"] / scale,
            "kl": g["kl"] / seqs,
            "logprob_gap": g["logprob_gap"] / seqs,
            "logprob_gap_max": gmax,
            "entropy": g["entropy"] / tokens,
            "response_len": g["tokens"] / seqs,
            "grad_norm": self._grad_norm(local_norm),
            "lr": lr,
            "time_s": seconds,
        }
        w = max(g["algo_weight"], 1e-12)
        out.update({k.split("/", 1)[1]: v / w for k, v in g.items() if k.startswith("algo/")})
        return out

    def _local_grad_norm(self) -> float:
        """Pre-clip gradient norm from p.grad, for ZeRO-0 in fp32 where DeepSpeed does not record one;
        the gradients are then clipped with it (`clips_itself`).

        At the boundary DeepSpeed has already all-reduced p.grad (in backward), so this is global;
        a lone rank's (`reduces_alone`) is global as it is.
        """
        if self.engine.zero_optimization_stage() != 0:
            return float("nan")
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not params:
            return float("nan")
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if self.clips_itself:
            if not self.engine.is_gradient_accumulation_boundary():  # DeepSpeed would step unclipped
                raise RuntimeError("gradient clipping off DeepSpeed's accumulation boundary")
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        return float(norm)

    def _grad_norm(self, fallback: float) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return fallback
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def current_lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return float(self.engine.get_lr()[0])

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return int(self.engine.global_steps)

    # ------------------------------------------------------------ weights out

    def named_weights(self, *, on_device: bool = False, skip_tied: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF state-dict name, full tensor in the model dtype), every key of the HF state dict.

        A collective under ZeRO-3: every rank must exhaust the iterator (parameters are gathered
        one module at a time); every rank yields the full tensors (each rank feeds its own rollout
        replica). Tied weights appear under each of their names, unless `skip_tied`.

        Args:
            on_device: yield tensors on the learner's device (the GPU weight-sync backends read
                them there: no GPU -> CPU -> GPU round trip); ZeRO 0-2 then yield the live
                parameters without a copy (read them before the next optimizer step). Default:
                CPU copies.
            skip_tied: leave out ``lm_head.weight`` when the model ties it to the input
                embeddings (vLLM loads it from ``embed_tokens``), saving one vocab x hidden copy.
        """
        module = self.engine.module
        skip = "lm_head.weight" if skip_tied and getattr(module.config, "tie_word_embeddings", False) else None

        def out(t: torch.Tensor, gathered: bool) -> torch.Tensor:
            if not on_device:
                return t.detach().to("cpu", copy=True)
            return t.detach().clone() if gathered else t.detach()  # a gathered shard is freed after its module

        if self.cfg.zero_stage != 3:
            for name, t in module.state_dict().items():
                if name != skip:
                    yield name, out(t, gathered=False)
            return
        import deepspeed

        for prefix, sub in module.named_modules():
            params = {n: p for n, p in sub.named_parameters(recurse=False)}
            buffers = {n: b for n, b in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set}
            if not params and not buffers:
                continue
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                for n, t in {**params, **buffers}.items():
                    name = f"{prefix}.{n}" if prefix else n
                    if name != skip:
                        yield name, out(t, gathered=n in params)

    def free_cache(self) -> None:
        """Return the caching allocator's free blocks to the GPU (before a colocated vLLM wakes up)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save_hf(self, directory: str) -> None:
        """Write an HF model dir (config, safetensors, tokenizer files) loadable by transformers and vLLM.

        A collective under ZeRO-3 (all ranks call it); rank 0 writes. Raises DivergedError (before
        writing anything) if any weight is not finite.
        """
        state = dict(self.named_weights())
        bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # every rank holds the same full weights, so every rank raises
            from apo_ray.errors import DivergedError

            raise DivergedError(f"{len(bad)} of {len(state)} weight tensors are not finite (e.g. {bad[0]})")
        if self.rank != 0:
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(out, state_dict=state)
        src = Path(self.model_path)
        for pattern in _TOKENIZER_GLOBS:
            for f in src.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, out / f.name)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler; all ranks) + rank 0's HF dir in directory/hf."""
        # Nested under one key: DeepSpeed merges its own entries into the client state it returns.
        self.engine.save_checkpoint(directory, client_state={_CLIENT_KEY: client_state})
        self.save_hf(str(Path(directory) / "hf"))
        torch.distributed.barrier()

    def load_checkpoint(self, directory: str) -> dict:
        """Restore weights, optimizer and scheduler from `save_checkpoint`; returns its client_state."""
        path, client_state = self.engine.load_checkpoint(directory)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory!r}")
        return (client_state or {}).get(_CLIENT_KEY, {})

    # ------------------------------------------------------------ resources

    def peak_memory_gb(self) -> float:
        """Peak GPU memory allocated by torch (cuda) or peak process RSS (cpu), GiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


__all__ = ["Learner", "RolloutBatch", "aligned_logprobs", "stat_rows_per_chunk"]
