"""A*-PO and GRPO losses, advantages and token log-probs against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from apo_ray.algo import (
    astar_po_loss,
    group_advantages,
    grpo_loss,
    sequence_log_ratio,
    token_entropy,
    token_logprobs,
)

F64 = torch.float64


def t(x: list, dtype: torch.dtype = F64, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


# ---------------------------------------------------------------- A*-PO: a 2 x 3 batch by hand
#
# logp - ref = [[-1.0+1.5, -2.0+1.0, -0.5+0.5], [-0.3+0.2, -1.2+1.0, (masked)]]
#            = [[0.5, -1.0, 0.0], [-0.1, -0.2, -]]         -> log_ratio_B = [-0.5, -0.3]
# beta2 = 0.1                                              -> beta2 * log_ratio = [-0.05, -0.03]
# r - V* = [1 - 0.5, 0 - 0.25] = [0.5, -0.25]              -> residual = [-0.55, 0.22]
# residual^2 = [0.3025, 0.0484]                            -> loss = 0.3509 / 2 = 0.17545
# d loss / d logp_bt = 2 / B * residual_b * beta2 * m_bt   -> [[-0.055]*3, [0.022, 0.022, 0]]
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]]
REF = [[-1.5, -1.0, -0.5], [-0.2, -1.0, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
REWARD = [1.0, 0.0]
VSTAR = [0.5, 0.25]


def test_sequence_log_ratio_by_hand() -> None:
    lr = sequence_log_ratio(t(LOGP), t(REF), t(MASK))
    assert torch.allclose(lr, t([-0.5, -0.3]), atol=1e-12, rtol=0)


def test_astar_po_loss_by_hand() -> None:
    logp = t(LOGP, grad=True)
    loss, stats = astar_po_loss(logp, t(REF), t(MASK), t(REWARD), t(VSTAR), 0.1)
    assert loss.item() == pytest.approx(0.17545, abs=1e-12)
    assert stats["log_ratio_mean"] == pytest.approx(-0.4, abs=1e-12)
    assert stats["residual_mean"] == pytest.approx((-0.55 + 0.22) / 2, abs=1e-12)
    assert stats["residual_sq_mean"] == pytest.approx(0.17545, abs=1e-12)
    assert stats["adv_mean"] == pytest.approx(0.125, abs=1e-12)
    assert "entropy" not in stats
    assert all(type(v) is float for v in stats.values())
    loss.backward()
    expected = t([[-0.055, -0.055, -0.055], [0.022, 0.022, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-12, rtol=0)


def test_astar_po_loss_normalizer_and_entropy_bonus() -> None:
    # normalizer = 1: the plain sum 0.3509.
    loss, _ = astar_po_loss(t(LOGP), t(REF), t(MASK), t(REWARD), t(VSTAR), 0.1, normalizer=1)
    assert loss.item() == pytest.approx(0.3509, abs=1e-12)
    # entropy on the 5 masked tokens: (1 + 2 + 3 + 4 + 5) / 5 = 3 (the masked 100 is ignored).
    # loss = 0.17545 - 0.01 * 3 = 0.14545.
    entropy = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    loss, stats = astar_po_loss(
        t(LOGP), t(REF), t(MASK), t(REWARD), t(VSTAR), 0.1, entropy_BT=entropy, entropy_coef=0.01
    )
    assert loss.item() == pytest.approx(0.14545, abs=1e-12)
    assert stats["entropy"] == pytest.approx(3.0, abs=1e-12)
    # num_tokens = 10 divides the summed entropy 15: 0.17545 - 0.01 * 1.5 = 0.16045; stats stay local.
    loss, stats = astar_po_loss(
        t(LOGP), t(REF), t(MASK), t(REWARD), t(VSTAR), 0.1, entropy_BT=entropy, entropy_coef=0.01, num_tokens=10
    )
    assert loss.item() == pytest.approx(0.16045, abs=1e-12)
    assert stats["entropy"] == pytest.approx(3.0, abs=1e-12)


def test_astar_po_loss_zero_when_on_target() -> None:
    # beta2 * log_ratio == r - V*: log_ratio = 2 on row 0, 0 on row 1; beta2 = 0.25 -> targets 0.5, 0.
    loss, stats = astar_po_loss(
        t([[1.0, 1.0]] * 2), t([[0.0, 0.0], [1.0, 1.0]]), t([[1, 1]] * 2), t([1.0, 0.5]), t([0.5, 0.5]), 0.25
    )
    assert loss.item() == 0.0
    assert stats["residual_sq_mean"] == 0.0


def test_astar_po_loss_mask_dtype_and_garbage_in_padding() -> None:
    # Padding holding -inf (and a bool mask) must change nothing, in the loss or the grad.
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -math.inf]], grad=True)
    ref = t([[-1.5, -1.0, -0.5], [-0.2, -1.0, math.inf]])
    loss, _ = astar_po_loss(logp, ref, torch.tensor(MASK, dtype=torch.bool), t(REWARD), t(VSTAR), 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.17545, abs=1e-12)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 2].item() == 0.0


def test_astar_po_loss_bf16_inputs_upcast() -> None:
    loss, _ = astar_po_loss(t(LOGP, torch.bfloat16), t(REF, torch.bfloat16), t(MASK), t(REWARD), t(VSTAR), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.17545, abs=2e-3)  # inputs rounded to bf16


def test_astar_po_loss_gradcheck() -> None:
    torch.manual_seed(0)
    mask = (torch.rand(3, 4) > 0.3).to(F64)
    ref = torch.randn(3, 4, dtype=F64)
    reward, vs = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)
    logp = torch.randn(3, 4, dtype=F64, requires_grad=True)
    ent = torch.rand(3, 4, dtype=F64, requires_grad=True)

    def fn(logp_BT: torch.Tensor, ent_BT: torch.Tensor) -> torch.Tensor:
        return astar_po_loss(logp_BT, ref, mask, reward, vs, 0.3, entropy_BT=ent_BT, entropy_coef=0.05)[0]

    assert torch.autograd.gradcheck(fn, (logp, ent))


def _random_batch(b: int, tt: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tt + 1, (b,), generator=g)
    return {
        "logp": -torch.rand(b, tt, generator=g, dtype=F64) * 3,
        "ref": -torch.rand(b, tt, generator=g, dtype=F64) * 3,
        "old": -torch.rand(b, tt, generator=g, dtype=F64) * 3,
        "mask": (torch.arange(tt)[None, :] < lengths[:, None]).to(F64),
        "reward": (torch.rand(b, generator=g) > 0.5).to(F64),
        "vstar": torch.rand(b, generator=g, dtype=F64),
        "adv": torch.randn(b, generator=g, dtype=F64),
        "entropy": torch.rand(b, tt, generator=g, dtype=F64) * 2,
    }


def _astar(batch: dict[str, torch.Tensor], logp: torch.Tensor, sl: slice, **kw) -> torch.Tensor:
    return astar_po_loss(
        logp[sl], batch["ref"][sl], batch["mask"][sl], batch["reward"][sl], batch["vstar"][sl], 0.2,
        entropy_BT=batch["entropy"][sl], **kw,
    )[0]  # fmt: skip


def test_astar_po_sharded_equals_global() -> None:
    # 8 sequences, one rank, 4 micro-batches of 2 whose losses (and grads) are summed:
    # normalizer = M_global = 8, num_tokens = all tokens of the step.
    batch = _random_batch(8, 5, seed=1)
    n_tok = batch["mask"].sum()
    logp_full = batch["logp"].clone().requires_grad_(True)
    full = _astar(batch, logp_full, slice(None), entropy_coef=0.01)
    full.backward()

    logp = batch["logp"].clone().requires_grad_(True)
    total = sum(
        _astar(batch, logp, slice(i, i + 2), normalizer=8, entropy_coef=0.01, num_tokens=n_tok) for i in range(0, 8, 2)
    )
    total.backward()
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(logp.grad, logp_full.grad, atol=1e-12, rtol=0)


def test_astar_po_data_parallel_equals_global() -> None:
    # W = 2 ranks x G = 2 accumulation steps of 2 sequences, grads averaged over G (DeepSpeed
    # scales each micro-batch loss by 1/G) and over W (all-reduce mean):
    # normalizer = M_global / (W * G) = 2, num_tokens = all tokens / (W * G).
    batch = _random_batch(8, 5, seed=2)
    w, g = 2, 2
    logp_full = batch["logp"].clone().requires_grad_(True)
    full = _astar(batch, logp_full, slice(None), entropy_coef=0.01)
    full.backward()

    logp = batch["logp"].clone().requires_grad_(True)
    n_tok = batch["mask"].sum() / (w * g)
    kw = {"normalizer": 8 / (w * g), "entropy_coef": 0.01, "num_tokens": n_tok}
    rank_losses = [sum(_astar(batch, logp, slice(s, s + 2), **kw) / g for s in starts) for starts in ([0, 2], [4, 6])]
    averaged = sum(rank_losses) / w
    averaged.backward()
    assert averaged.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(logp.grad, logp_full.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- GRPO


def test_group_advantages_by_hand() -> None:
    # [1, 0, 0, 1]: mean 0.5, population std 0.5 -> [1, -1, -1, 1] (up to eps).
    # [1, 0, 0, 0]: mean 0.25, std sqrt(0.25 * 0.75) = sqrt(3) / 4 -> [sqrt(3), -1/sqrt(3) x 3].
    # [1, 1, 1, 1]: std 0 -> 0 / eps = 0.
    adv = group_advantages(torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]]))
    s3 = math.sqrt(3)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [s3, -1 / s3, -1 / s3, -1 / s3], [0.0, 0.0, 0.0, 0.0]])
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, expected, atol=1e-5, rtol=0)
    adv64 = group_advantages(t([[1, 0, 0, 1]]), eps=0.0)
    assert torch.equal(adv64, t([[1.0, -1.0, -1.0, 1.0]]))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]))


# Two sequences x 2 tokens, old = logp - log(ratio), kl_coef = 0, eps = 0.2:
#   row 0, A = +1: ratio 1.5 -> -min(1.5, 1.2) = -1.2 (clipped, grad 0)
#                  ratio 0.5 -> -min(0.5, 0.8) = -0.5 (grad -A * ratio = -0.5)
#   row 1, A = -1: ratio 1.5 -> -min(-1.5, -1.2) = 1.5 (grad 1.5)
#                  ratio 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped, grad 0)
#   loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clip_frac 2/4; ratio_mean (1.5+0.5+1.5+0.5)/4 = 1.
RATIOS = [[1.5, 0.5], [1.5, 0.5]]


def test_grpo_clipping_by_hand() -> None:
    logp = t([[-1.0, -2.0], [-0.5, -1.5]], grad=True)
    old = logp.detach() - torch.log(t(RATIOS))
    loss, stats = grpo_loss(logp, old, logp.detach(), t([[1, 1], [1, 1]]), t([1.0, -1.0]), 0.2, 0.0)
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(0.5, abs=1e-12)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert stats["kl_k3_mean"] == 0.0  # ref == logp
    loss.backward()
    assert torch.allclose(logp.grad, t([[0.0, -0.5], [1.5, 0.0]]) / 4, atol=1e-12, rtol=0)


def test_grpo_mask_and_num_tokens() -> None:
    # Mask out row 1 token 1 (0.8): sum = -1.2 - 0.5 + 1.5 = -0.2 over 3 tokens; or over num_tokens = 10.
    logp = t([[-1.0, -2.0], [-0.5, -1.5]])
    old = logp - torch.log(t(RATIOS))
    mask = t([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, old, logp, mask, t([1.0, -1.0]), 0.2, 0.0)
    assert loss.item() == pytest.approx(-0.2 / 3, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(1 / 3, abs=1e-12)
    loss, _ = grpo_loss(logp, old, logp, mask, t([1.0, -1.0]), 0.2, 0.0, num_tokens=10)
    assert loss.item() == pytest.approx(-0.02, abs=1e-12)


def test_grpo_k3_kl_by_hand() -> None:
    # ratio 1 and A = 0: only the KL term. ref - logp = [ln 2, -ln 2, 0]:
    #   k3 = e^x - x - 1 = [2 - ln 2 - 1, 1/2 + ln 2 - 1, 0] = [1 - ln 2, ln 2 - 1/2, 0]
    #   mean = 0.5 / 3; loss = kl_coef * mean = 0.1 * 0.5 / 3.
    logp = t([[-1.0, -1.0, -1.0]], grad=True)
    ref = logp.detach() + t([[math.log(2), -math.log(2), 0.0]])
    loss, stats = grpo_loss(logp, logp.detach(), ref, t([[1, 1, 1]]), t([0.0]), 0.2, 0.1)
    assert stats["kl_k3_mean"] == pytest.approx(0.5 / 3, abs=1e-12)
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-12)
    # d k3 / d logp = 1 - e^(ref - logp) = [-1, 0.5, 0]; times kl_coef / 3.
    loss.backward()
    assert torch.allclose(logp.grad, t([[-1.0, 0.5, 0.0]]) * 0.1 / 3, atol=1e-12, rtol=0)
    # k3 == 0 when logp == ref.
    _, stats = grpo_loss(logp, logp.detach(), logp.detach(), t([[1, 1, 1]]), t([1.0]), 0.2, 0.1)
    assert stats["kl_k3_mean"] == 0.0


def test_grpo_entropy_bonus_by_hand() -> None:
    # The clipping case above (loss 0.15 over 4 tokens) with token entropies [[1, 2], [3, 100]],
    # the 100 masked out: mean entropy (1 + 2 + 3) / 3 = 2 over the 3 masked-in tokens.
    logp = t([[-1.0, -2.0], [-0.5, -1.5]])
    old = logp - torch.log(t(RATIOS))
    mask, adv = t([[1, 1], [1, 0]]), t([1.0, -1.0])
    entropy = t([[1.0, 2.0], [3.0, 100.0]], grad=True)
    base, stats = grpo_loss(logp, old, logp, mask, adv, 0.2, 0.0, entropy_BT=entropy)
    assert base.item() == pytest.approx(-0.2 / 3, abs=1e-12)  # coefficient 0: the loss is unchanged
    assert stats["entropy"] == pytest.approx(2.0, abs=1e-12)
    loss, _ = grpo_loss(logp, old, logp, mask, adv, 0.2, 0.0, entropy_BT=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.2 / 3 - 0.01 * 2.0, abs=1e-12)
    loss.backward()  # d loss / d H = -coef / tokens on masked-in tokens, 0 on the masked one
    assert torch.allclose(entropy.grad, t([[-0.01, -0.01], [-0.01, 0.0]]) / 3, atol=1e-12, rtol=0)
    # num_tokens = 10 divides the bonus too: the same token-mean normaliser as the surrogate.
    loss, _ = grpo_loss(logp, old, logp, mask, adv, 0.2, 0.0, num_tokens=10, entropy_BT=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.02 - 0.01 * 6.0 / 10, abs=1e-12)


def test_grpo_gradcheck() -> None:
    batch = _random_batch(3, 4, seed=3)
    # Keep ratios away from the clip edges (1 +- eps), where the loss is not differentiable.
    old = batch["logp"] - 0.05

    def fn(logp_BT: torch.Tensor) -> torch.Tensor:
        return grpo_loss(logp_BT, old, batch["ref"], batch["mask"], batch["adv"], 0.2, 0.1)[0]

    assert torch.autograd.gradcheck(fn, (batch["logp"].clone().requires_grad_(True),))


def test_grpo_sharded_equals_global() -> None:
    batch = _random_batch(8, 5, seed=4)
    old = batch["logp"] + 0.3 * torch.randn(8, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    args = (old, batch["ref"], batch["mask"], batch["adv"])

    ent = batch["entropy"]
    logp_full = batch["logp"].clone().requires_grad_(True)
    full, _ = grpo_loss(logp_full, *args, 0.2, 0.1, entropy_BT=ent, entropy_coef=0.01)
    full.backward()

    logp = batch["logp"].clone().requires_grad_(True)
    n_tok = batch["mask"].sum()
    kw = {"num_tokens": n_tok, "entropy_coef": 0.01}
    total = sum(
        grpo_loss(logp[i : i + 2], *(a[i : i + 2] for a in args), 0.2, 0.1, entropy_BT=ent[i : i + 2], **kw)[0]
        for i in range(0, 8, 2)
    )
    total.backward()
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(logp.grad, logp_full.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- token log-probs and entropy


def test_token_logprobs_by_hand() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4]; at temperature 2, [0, ln sqrt 3] -> [1, sqrt 3] / (1 + sqrt 3).
    logits = t([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    tokens = torch.tensor([[1, 0]])
    assert torch.allclose(token_logprobs(logits, tokens), t([[math.log(0.75), math.log(0.25)]]), atol=1e-12, rtol=0)
    s3 = math.sqrt(3)
    expected = t([[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]])
    assert torch.allclose(token_logprobs(logits, tokens, temperature=2.0), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)


def test_token_logprobs_matches_log_softmax_and_bf16_upcasts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    tokens = torch.randint(0, 11, (3, 5))
    manual = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, 0.7), manual, atol=1e-5, rtol=0)

    logits_bf16 = logits.bfloat16()
    out = token_logprobs(logits_bf16, tokens, 0.7)
    assert out.dtype == torch.float32
    manual_bf16 = torch.log_softmax(logits_bf16.float() / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(out, manual_bf16, atol=1e-5, rtol=0)


def test_token_entropy_by_hand() -> None:
    # Uniform over 4: ln 4. Logits [0, ln 3] -> softmax [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4).
    h = token_entropy(t([[[0.0, 0.0, 0.0, 0.0]]]))
    assert h.item() == pytest.approx(math.log(4), abs=1e-12)
    h = token_entropy(t([[[0.0, math.log(3)]]]))
    assert h.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)
    # temperature < 1 sharpens, so lowers the entropy; bf16 gives float32.
    logits = torch.randn(2, 3, 7)
    assert (token_entropy(logits, temperature=0.5) < token_entropy(logits)).all()
    assert token_entropy(logits.bfloat16()).dtype == torch.float32
    assert torch.allclose(token_entropy(logits.bfloat16()), token_entropy(logits.bfloat16().float()), atol=1e-6)


def test_logprobs_and_entropy_gradcheck() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 0.8), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, 0.8), (logits,))
    # bf16 path (row loop) also carries gradients.
    lb = logits.detach().bfloat16().requires_grad_(True)
    token_logprobs(lb, tokens).sum().backward()
    assert lb.grad is not None and torch.isfinite(lb.grad.float()).all()
