"""The Stage 2 learner on real DeepSpeed (CPU, gloo) and a tiny random Qwen2.

Checked against plain torch autograd on a separate HF copy of the model: the loss value,
the gradient norm of one optimizer step (this is what proves the normaliser plumbing:
Adam's update is nearly scale-invariant, so equal weights alone would not), micro-batching
vs accumulation vs two ranks, checkpoint round trips, weight export and ZeRO-3.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from apo_ray.config import TrainConfig

pytestmark = pytest.mark.integration

LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


@pytest.fixture(scope="module")
def dist_group():
    """A one-process gloo group, as Ray Train would have set up (destroyed after the module)."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    created = not torch.distributed.is_initialized()
    if created:
        _init_group(0, 1, _free_port())
    yield
    if created:
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(tiny_random_model_dir) -> str:
    return str(tiny_random_model_dir)  # tests/conftest.py: random tiny Qwen2 + byte-level tokenizer


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=LR, beta2=0.05, micro_batch_size=2, zero_stage=0, grad_clip=1.0, weight_decay=0.01, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _learner(model_dir: str, seqs: int, **kw):
    from apo_ray.train.learner import Learner

    return Learner(model_dir, _cfg(**kw), world_size=1, rank=0, seqs_per_optimizer_step=seqs)


def _batch(n: int, seed: int = 0, vocab: int = 200):
    """n sequences of varied prompt/response lengths, rewards in {0,1}, V* in [0,1], fake engine log-probs."""
    from apo_ray.train.learner import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses, engine = [], [], []
    for i in range(n):
        p, r = 2 + i % 3, 1 + (3 * i) % 7
        prompts.append(torch.randint(3, vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(3, vocab, (r,), generator=g).tolist())
        engine.append((-torch.rand(r, generator=g) * 5).tolist())
    reward = [float(i % 2) for i in range(n)]
    vstar = [0.125 * (i % 8) for i in range(n)]
    adv = [(-1.0) ** i * (1 + i % 3) / 2 for i in range(n)]
    return RolloutBatch.from_sequences(prompts, responses, engine, reward, vstar, adv, pad_id=0)


def _weights(learner) -> dict[str, torch.Tensor]:
    return dict(learner.named_weights())


def assert_same_adam_steps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], steps: int) -> None:
    """Weights after the same `steps` Adam steps taken two ways (accumulated, sharded, ZeRO-3).

    Agree to 1e-5, except where Adam amplifies rounding: on a weight whose gradient is ~0, the two
    ways' sums round differently and m / sqrt(v) can flip, moving it by up to lr per step (measured:
    1 of 65,536 elements, 1.2e-5 apart, on an Intel Xeon; none on AMD EPYC). A real bug (a wrong
    normaliser, a lost micro-batch) moves most elements, so at most 1e-4 of them may differ, by no
    more than the steps could move them.
    """
    for k, v in want.items():
        diff = (got[k] - v).abs()
        off = int((diff > 1e-5).sum())
        assert off <= max(1, v.numel() // 10_000), f"{k}: {off} of {v.numel()} elements differ by more than 1e-5"
        assert float(diff.max()) <= 2 * steps * LR, f"{k}: max difference {float(diff.max()):.2e}"


def _hf_logp(model, batch) -> torch.Tensor:
    """Independent of the learner: log p(token t | < t) at position t, 0 at t = 0 and on padding."""
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0)) * batch.attention_mask_BT


def _reference_grad_norm(model_dir: str, batch, algo: str, beta2: float = 0.05) -> tuple[float, float]:
    """(loss, grad norm) of the global-batch loss by plain torch autograd on a fresh HF model."""
    from transformers import AutoModelForCausalLM

    from apo_ray.algo import astar_po_loss, grpo_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = _hf_logp(model, batch)
    logp = _hf_logp(model, batch)
    mask = batch.response_mask_BT
    if algo == "astar_po":
        loss, _ = astar_po_loss(logp, ref, mask, batch.reward_B, batch.vstar_B, beta2)
    else:
        loss, _ = grpo_loss(logp, logp.detach(), ref, mask, batch.adv_B, 0.2, 0.001)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), float(norm)


# ---------------------------------------------------------------- batch layout (no DeepSpeed)


def test_from_sequences_alignment():
    from apo_ray.train.learner import RolloutBatch

    b = RolloutBatch.from_sequences([[5, 6], [7]], [[8], [9, 10]], [[-0.5], [-1.0, -2.0]], [1, 0], [0.5, 0], None, 0)
    assert b.input_ids_BT.tolist() == [[5, 6, 8], [7, 9, 10]]
    assert b.attention_mask_BT.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert b.response_mask_BT.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert b.engine_logp_BT.tolist() == [[0, 0, -0.5], [0, -1.0, -2.0]]
    assert b.adv_B.tolist() == [0, 0]
    b = RolloutBatch.from_sequences([[5, 6, 7], [1]], [[8], [2]], None, [1, 0], None, None, pad_id=99)
    assert b.input_ids_BT.tolist() == [[5, 6, 7, 8], [1, 2, 99, 99]]
    assert b.response_mask_BT.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    assert len(b.slice([1])) == 1 and b.slice([1]).trimmed().input_ids_BT.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="empty prompt"):
        RolloutBatch.from_sequences([[]], [[1]], None, [0], None, None, 0)


# ---------------------------------------------------------------- DeepSpeed on CPU


def test_reference_equals_policy_before_training(dist_group, model_dir):
    from transformers import AutoModelForCausalLM

    learner = _learner(model_dir, seqs=4)
    batch = _batch(6)
    logp, ref = learner.logprobs(batch, ref=False), learner.logprobs(batch, ref=True)
    assert torch.equal(logp, ref)
    # the alignment convention, against a plain HF forward
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(logp, _hf_logp(hf, batch), rtol=0, atol=1e-5)
    assert (logp[:, 0] == 0).all() and (logp[batch.attention_mask_BT == 0] == 0).all()
    stats = learner.train_minibatch(batch.slice(slice(0, 4)), algo="astar_po", normalizer_seqs=4)
    assert stats["kl"] == 0.0


def test_astar_po_step_matches_loss_and_updates_weights(dist_group, model_dir):
    from apo_ray.algo import astar_po_loss, sequence_log_ratio
    from apo_ray.train.learner import RolloutBatch

    learner = _learner(model_dir, seqs=4, micro_batch_size=4)
    # Before the first step pi = pi_ref, so the loss is mean (r - V*)^2 of residuals
    # -0.5, 0.25, -0.25, 0 -> (0.25 + 0.0625 + 0.0625 + 0) / 4 = 0.09375.
    b = RolloutBatch.from_sequences(
        [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12]],
        [[13, 14], [15, 16, 17], [18], [19, 20]],
        [[-1.0, -2.0], [-1.0, -1.0, -1.0], [-3.0], [-0.5, -0.5]],
        reward=[1.0, 0.0, 1.0, 0.0],
        vstar=[0.5, -0.25, 0.75, 0.0],
        adv=None,
        pad_id=0,
    )
    before = _weights(learner)
    logp0 = learner.logprobs(b, ref=False)
    stats = learner.train_minibatch(b, algo="astar_po", normalizer_seqs=4)
    assert stats["loss"] == pytest.approx(0.09375, rel=1e-6)
    engine_sum = torch.tensor([-3.0, -3.0, -3.0, -1.0])
    gap = (engine_sum - (logp0 * b.response_mask_BT).sum(-1)).abs()
    assert stats["logprob_gap"] == pytest.approx(float(gap.mean()), rel=1e-5)
    assert stats["logprob_gap_max"] == pytest.approx(float(gap.max()), rel=1e-5)
    assert stats["response_len"] == pytest.approx(2.0) and stats["grad_norm"] > 0
    assert 0 < learner.peak_memory_gb() < 64

    after = _weights(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Second step: pi != pi_ref now; the reported loss is astar_po_loss on the same tensors.
    logp, ref = learner.logprobs(b, ref=False), learner.logprobs(b, ref=True)
    expected, _ = astar_po_loss(logp, ref, b.response_mask_BT, b.reward_B, b.vstar_B, 0.05)
    stats = learner.train_minibatch(b, algo="astar_po", normalizer_seqs=4)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert stats["loss"] == pytest.approx(float(expected), rel=1e-5)
    kl = sequence_log_ratio(logp, ref, b.response_mask_BT).mean()
    assert stats["kl"] != 0 and stats["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)


def test_zero0_clips_as_deepspeed_would(dist_group, model_dir, monkeypatch):
    """ZeRO-0 clips the gradients itself (torch's kernels, `Learner.clips_itself`): the same steps as
    DeepSpeed's own clipping, with clipping on (grad_clip far below the gradient norm). Adam's
    update hardly sees a uniform scale, so the clipped gradients are read from its first moment."""
    from apo_ray.train.learner import Learner

    def first_moments(learner) -> list[torch.Tensor]:
        opt = learner.engine.optimizer
        return [opt.state[p]["exp_avg"].clone() for g in opt.param_groups for p in g["params"]]

    batch, clip = _batch(8), 1e-3
    ours = _learner(model_dir, 8, grad_clip=clip, micro_batch_size=4)
    unclipped = _learner(model_dir, 8, grad_clip=0.0, micro_batch_size=4)
    assert ours.clips_itself and ours.engine.gradient_clipping() == 0.0 and not unclipped.clips_itself
    monkeypatch.setattr(Learner, "CLIP_IN_TORCH", False)
    theirs = _learner(model_dir, 8, grad_clip=clip, micro_batch_size=4)
    assert not theirs.clips_itself and theirs.engine.gradient_clipping() == clip
    for _ in range(3):
        a, b, c = (x.train_minibatch(batch, algo="astar_po", normalizer_seqs=8) for x in (ours, theirs, unclipped))
        assert a["grad_norm"] > 100 * clip
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    m_ours, m_theirs, m_free = first_moments(ours), first_moments(theirs), first_moments(unclipped)
    for x, y, z in zip(m_ours, m_theirs, m_free):
        # Near-zero elements round differently in the two orders of summation (seen on an AMD EPYC:
        # 3e-12 apart in a tensor whose largest element is 6e-6): the tolerance is relative to the tensor.
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
        assert float(x.abs().max()) < 0.1 * float(z.abs().max()) or float(z.abs().max()) == 0.0
    assert_same_adam_steps(_weights(ours), _weights(theirs), steps=3)


def test_a_lone_rank_without_the_gradient_allreduce_takes_the_same_steps(dist_group, model_dir, monkeypatch):
    """One fp32 ZeRO-0 rank leaves out DeepSpeed's gradient all-reduce (`Learner.reduces_alone`):
    the same stats and the same weights, bit for bit, as with it (with accumulation and clipping on)."""
    from apo_ray.train.learner import Learner

    batch = _batch(8, seed=2)
    ours = _learner(model_dir, 8, micro_batch_size=2, grad_clip=1e-3)
    monkeypatch.setattr(Learner, "SKIP_LONE_ALLREDUCE", False)
    theirs = _learner(model_dir, 8, micro_batch_size=2, grad_clip=1e-3)
    assert ours.reduces_alone and not ours.engine.enable_backward_allreduce
    assert not theirs.reduces_alone and theirs.engine.enable_backward_allreduce
    for algo in ("astar_po", "grpo", "astar_po"):
        a, b = (x.train_minibatch(batch, algo=algo, normalizer_seqs=8) for x in (ours, theirs))
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}
    for (name, x), (_, y) in zip(ours.named_weights(), theirs.named_weights()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("algo", ["astar_po", "grpo"])
def test_accumulation_equals_one_big_micro_batch(dist_group, model_dir, algo):
    batch = _batch(8, seed=1)
    ref_loss, ref_norm = _reference_grad_norm(model_dir, batch, algo)
    results = []
    for micro in (2, 8):  # 4 accumulation steps of 2 vs 1 step of 8
        learner = _learner(model_dir, seqs=8, micro_batch_size=micro)
        s1 = learner.train_minibatch(batch, algo=algo, normalizer_seqs=8)
        s2 = learner.train_minibatch(batch, algo=algo, normalizer_seqs=8)  # Adam moments involved
        assert s1["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert s1["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
        results.append((s2, _weights(learner)))
    (s_a, w_a), (s_b, w_b) = results
    assert s_a["grad_norm"] == pytest.approx(s_b["grad_norm"], rel=1e-4)
    assert_same_adam_steps(w_a, w_b, steps=2)


def test_grpo_minibatch(dist_group, model_dir):
    learner = _learner(model_dir, seqs=4)
    b = _batch(4, seed=2)
    # ratio 1 and k3 = 0 before any step: loss = -sum_b adv_b * len_b / total tokens.
    lengths = b.response_mask_BT.sum(-1)
    expected = float(-(b.adv_B * lengths).sum() / lengths.sum())
    stats = learner.train_minibatch(b, algo="grpo", normalizer_seqs=4)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    old = learner.logprobs(b, ref=False)  # an off-policy second step with explicit old log-probs
    stats = learner.train_minibatch(b, algo="grpo", normalizer_seqs=4, old_logp_BT=old, num_tokens=int(lengths.sum()))
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["kl_k3_mean"] > 0


def test_checkpoint_round_trip(dist_group, model_dir, tmp_path):
    b1, b2 = _batch(4, seed=3), _batch(4, seed=4)
    a = _learner(model_dir, seqs=4, warmup_steps=3)
    a.train_minibatch(b1, algo="astar_po", normalizer_seqs=4)
    a.save_checkpoint(str(tmp_path / "ckpt"), {"step": 1, "data": [1, 2]})
    saved = _weights(a)
    s_a = a.train_minibatch(b2, algo="astar_po", normalizer_seqs=4)
    w_a = _weights(a)

    b = _learner(model_dir, seqs=4, warmup_steps=3)
    assert b.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 1, "data": [1, 2]}
    assert b.global_step == 1
    for k, v in _weights(b).items():
        assert torch.equal(v, saved[k]), k
    s_b = b.train_minibatch(b2, algo="astar_po", normalizer_seqs=4)
    assert s_b["lr"] == s_a["lr"] == pytest.approx(LR * 2 / 3)  # scheduler state restored
    for k, v in _weights(b).items():
        torch.testing.assert_close(v, w_a[k], rtol=0, atol=1e-7)
    assert (tmp_path / "ckpt" / "hf" / "config.json").is_file()


def test_named_weights_and_save_hf(dist_group, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = _learner(model_dir, seqs=4)
    learner.train_minibatch(_batch(4), algo="astar_po", normalizer_seqs=4)
    weights = _weights(learner)
    hf_state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert set(weights) == set(hf_state)
    assert all(weights[k].shape == hf_state[k].shape and weights[k].device.type == "cpu" for k in weights)

    learner.save_hf(str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k
    tokenizer_files = {p.name for p in (tmp_path / "hf").iterdir()} & {"tokenizer.json", "tokenizer_config.json"}
    assert tokenizer_files == {p.name for p in os.scandir(model_dir)} & {"tokenizer.json", "tokenizer_config.json"}
    if tokenizer_files:
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode("1+2") == AutoTokenizer.from_pretrained(
            model_dir
        ).encode("1+2")


def test_zero3_matches_zero0_and_gathers_full_weights(dist_group, model_dir):
    batch = _batch(4, seed=5)
    out = {}
    for stage in (0, 3):
        learner = _learner(model_dir, seqs=4, zero_stage=stage)
        assert torch.equal(learner.logprobs(batch, ref=False), learner.logprobs(batch, ref=True))
        stats = learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=4)
        out[stage] = (stats, _weights(learner))
    assert out[3][0]["loss"] == pytest.approx(out[0][0]["loss"], rel=1e-5)
    assert out[3][0]["grad_norm"] == pytest.approx(out[0][0]["grad_norm"], rel=1e-4)
    w0, w3 = out[0][1], out[3][1]
    assert set(w3) == set(w0)
    for k in w0:
        assert w3[k].shape == w0[k].shape, k
    assert_same_adam_steps(w3, w0, steps=1)


# ---------------------------------------------------------------- two ranks


def _two_rank_worker(rank: int, port: int, model_dir: str, out_path: str) -> None:
    _init_group(rank, 2, port)
    from apo_ray.train.learner import Learner

    learner = Learner(model_dir, _cfg(micro_batch_size=2), world_size=2, rank=rank, seqs_per_optimizer_step=8)
    assert not learner.reduces_alone and learner.engine.enable_backward_allreduce
    batch = _batch(8, seed=1)
    shard = batch.slice(slice(4 * rank, 4 * rank + 4))  # 2 accumulation steps of 2 per rank
    t0 = time.perf_counter()
    stats = [learner.train_minibatch(shard, algo=algo, normalizer_seqs=8) for algo in ("astar_po", "grpo")]
    stats[0]["wall_s"] = time.perf_counter() - t0
    weights = _weights(learner)
    if rank == 0:
        torch.save({"stats": stats, "weights": weights}, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank(dist_group, model_dir, tmp_path):
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), model_dir, out), nprocs=2, join=True)
    got = torch.load(out)
    batch = _batch(8, seed=1)
    one = _learner(model_dir, seqs=8, micro_batch_size=8)
    expected = [one.train_minibatch(batch, algo=algo, normalizer_seqs=8) for algo in ("astar_po", "grpo")]
    for s2, s1 in zip(got["stats"], expected):
        for key in ("loss", "kl", "grad_norm", "logprob_gap", "entropy", "response_len"):
            assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-7), key
    assert_same_adam_steps(got["weights"], _weights(one), steps=2)


# ---------------------------------------------------------------- bf16 (as on GPUs), on the CPU


def _bf16_learner(model_dir: str, seqs: int, **kw):
    from apo_ray.train.learner import Learner

    return Learner(model_dir, _cfg(**kw), world_size=1, rank=0, seqs_per_optimizer_step=seqs, dtype="bfloat16")


def test_bf16_reference_casts_parameters_only_and_equals_the_policy_at_step_0(dist_group, model_dir):
    learner = _bf16_learner(model_dir, seqs=4, micro_batch_size=4, zero_stage=2)
    assert {p.dtype for p in learner.ref.parameters()} == {torch.bfloat16}
    float_buffers = {n: b.dtype for n, b in learner.ref.named_buffers() if b.is_floating_point()}
    assert float_buffers and set(float_buffers.values()) == {torch.float32}, float_buffers  # e.g. rotary inv_freq
    policy_buffers = {n: b.dtype for n, b in learner.engine.module.named_buffers() if b.is_floating_point()}
    assert policy_buffers == float_buffers  # the same as DeepSpeed keeps the policy's
    batch = _batch(4, seed=3)
    torch.testing.assert_close(learner.logprobs(batch, ref=False), learner.logprobs(batch, ref=True), rtol=0, atol=0)
    stats = learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=4)
    assert stats["kl"] == 0.0  # log pi - log pi_ref is exactly 0 before the first update


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_gradients_accumulate_in_fp32(dist_group, model_dir, zero):
    """8 micro-batches of 1 vs one micro-batch of 8, bf16 weights: DeepSpeed is told to accumulate in
    fp32, and the accumulated gradient norm equals the one-shot one within bf16 forward noise (2 %)."""
    batch = _batch(8, seed=1)
    norms = []
    for micro in (1, 8):
        learner = _bf16_learner(model_dir, seqs=8, micro_batch_size=micro, zero_stage=zero)
        assert learner.engine.get_data_types() == (torch.bfloat16, torch.float32)
        norms.append(learner.train_minibatch(batch, algo="astar_po", normalizer_seqs=8)["grad_norm"])
    assert math.isfinite(norms[0]) and norms[0] == pytest.approx(norms[1], rel=2e-2), norms


def test_bf16_with_zero0_is_refused(dist_group, model_dir):
    from apo_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="train.zero_stage': 0 with bfloat16"):
        _bf16_learner(model_dir, seqs=4, micro_batch_size=4, zero_stage=0)


def test_memory_planner_resident_state_matches_the_real_learner(dist_group, model_dir):
    """apo_ray.memory's resident-state formulas against the tensors of the real DeepSpeed learner
    (CPU, fp32, ZeRO-0, one rank) after one optimizer step: weights, reference, Adam moments."""
    from apo_ray.config import load_config
    from apo_ray.memory import learner_bytes, shape_of

    learner = _learner(model_dir, seqs=4)
    learner.train_minibatch(_batch(4, seed=5), algo="astar_po", normalizer_seqs=4)

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    module = learner.engine.module
    state = learner.engine.optimizer.state.values()
    measured = {
        "weights": nbytes(module.parameters()),
        "reference": nbytes(learner.ref.parameters()),
        "adam_moments": nbytes(v for st in state for v in st.values() if torch.is_tensor(v) and v.dim()),
    }
    cfg = load_config("demo", ["train.zero_stage=0", "train.micro_batch_size=2"])
    planned = learner_bytes(shape_of(model_dir), cfg, "float32")
    for key, value in measured.items():
        assert planned[key] == pytest.approx(value, rel=0.01), (key, planned[key], value)


# ---------------------------------------------------------------- weights for the engine; a failed sync


def test_engine_weights_are_device_tensors_without_copy_and_without_a_tied_head(dist_group, tmp_path):
    from apo_ray.gpu_check import build_random_model
    from apo_ray.memory import ModelShape
    from apo_ray.train.learner import Learner

    tied = build_random_model(ModelShape(128, 2, 256, 300, 2, 1, True), tmp_path / "tied")
    learner = Learner(tied, _cfg(micro_batch_size=2), world_size=1, rank=0, seqs_per_optimizer_step=2)
    params = dict(learner.engine.module.named_parameters())
    live = dict(learner.named_weights(on_device=True, skip_tied=True))
    assert "lm_head.weight" not in live and "model.embed_tokens.weight" in live  # vLLM ties it itself
    for name, t in live.items():
        if name in params:  # ZeRO 0-2: the parameters themselves, no copy
            assert t.data_ptr() == params[name].data_ptr(), name
    copies = dict(learner.named_weights())  # checkpoints / save_hf: CPU copies of every key
    assert "lm_head.weight" in copies
    assert copies["model.norm.weight"].data_ptr() != params["model.norm.weight"].data_ptr()


def _sync_failure_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """Rank 1's push fails part-way through a ZeRO-3 gather; rank 0's succeeds. Both must stop."""
    import types

    _init_group(rank, 2, port)
    from apo_ray.train.learner import Learner
    from apo_ray.train.recipe import sync

    class Push:
        def push(self, weights, engine):
            for i, _ in enumerate(weights):
                if rank == 1 and i == 3:
                    raise OSError("engine call failed")

    learner = Learner(
        model_dir, _cfg(micro_batch_size=2, zero_stage=3), world_size=2, rank=rank, seqs_per_optimizer_step=4
    )
    plan = types.SimpleNamespace(sleep_engine=False, sync_backend="shm")
    ctx = types.SimpleNamespace(learner=learner, plan=plan, sync=Push(), engine=None, rank=rank)
    try:
        sync(ctx)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - the outcome is the test's subject
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, f"rank{rank}").write_text(outcome)


def test_a_failed_weight_sync_on_one_rank_stops_every_rank_promptly(dist_group, model_dir, tmp_path):
    ctx = torch.multiprocessing.spawn(
        _sync_failure_worker, args=(_free_port(), model_dir, str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.time() + 180
    while not ctx.join(timeout=5):
        assert time.time() < deadline, "a rank is still waiting in the ZeRO-3 gather"
    assert (tmp_path / "rank1").read_text() == "OSError: engine call failed"
    assert (tmp_path / "rank0").read_text().startswith("RuntimeError: rank 0: weight sync failed on another rank")
