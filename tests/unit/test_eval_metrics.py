"""Pure helpers of apo_ray.evaluation: the pass@k estimator, aggregation, model-path resolution and
the transformers log-prob alignment and the KL's log-ratios (on tiny random Qwen2s, CPU, seconds)."""

from __future__ import annotations

import math

import pytest

from apo_ray.config import ConfigError
from apo_ray.evaluation import aggregate, format_table, kl_log_ratios, pass_at_k, sequence_logprobs
from apo_ray.model import resolve_eval_model, same_model


def test_pass_at_k_hand_numbers():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@1 is the fraction correct
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n == k: any-correct
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0
    # fewer wrong samples than k: every k-subset holds a correct one
    assert pass_at_k(8, 7, 2) == 1.0


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 4, 2), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def _rec(correct: bool, num_correct: int = -1, log_ratio=None, tokens: int = 4, skipped: str = "") -> dict:
    return {
        "skipped": skipped,
        "correct": correct,
        "reward": float(correct),
        "response_tokens": tokens,
        "num_correct": num_correct,
        "log_ratio": log_ratio,
    }


def test_aggregate_counts_and_means():
    recs = [
        _rec(True, num_correct=4, log_ratio=0.1, tokens=2),
        _rec(False, num_correct=1, log_ratio=0.3, tokens=6),
        _rec(False, num_correct=0, log_ratio=None, tokens=4),  # no KL sample for this one
        {"prompt_id": "x", "skipped": "too_long"},
    ]
    m = aggregate(recs, k=4)
    assert m["num_prompts"] == 3 and m["num_skipped"] == 1
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["greedy_reward_mean"] == pytest.approx(1 / 3)
    assert m["mean_response_tokens"] == pytest.approx(4.0)
    # n == k: pass@k = any correct -> 1, 1, 0
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    assert m["sample_accuracy"] == pytest.approx((4 / 4 + 1 / 4 + 0) / 3)
    # KL over the two prompts that have one: mean 0.2, sample variance 0.02, stderr sqrt(0.02 / 2) = 0.1
    assert m["kl_to_ref"] == pytest.approx(0.2)
    assert m["kl_to_ref_stderr"] == pytest.approx(0.1)


def test_aggregate_reports_the_engine_gap_apart_from_the_kl():
    recs = [_rec(True, log_ratio=0.1), _rec(False, log_ratio=0.3), _rec(False, log_ratio=None)]
    recs[0]["engine_gap"], recs[1]["engine_gap"], recs[2]["engine_gap"] = 0.02, -0.04, None
    m = aggregate(recs, k=1)
    assert m["kl_to_ref"] == pytest.approx(0.2)  # the gap is not in it
    assert m["engine_logprob_gap"] == pytest.approx(0.03)  # mean |gap| of the prompts that have one
    assert aggregate([_rec(True, log_ratio=0.0)], k=1)["engine_logprob_gap"] is None
    report = {"model": "/m", "reference": "/r", **m, "k": 1, "kl_same_model": False, "seconds": 1.0}
    table = format_table({**report, "timings": {"engine_start_s": 0.0, "per_prompt_s": 0.01}})
    assert "KL to ref    0.2" in table and "log-prob gap 0.03, not in the KL" in table


def test_aggregate_without_k_or_kl_or_prompts():
    m = aggregate([_rec(True), _rec(True)], k=1)
    assert m["accuracy"] == 1.0 and "pass_at_k" not in m
    assert m["kl_to_ref"] is None and m["kl_to_ref_stderr"] is None
    empty = aggregate([], k=2)
    assert empty["num_prompts"] == 0 and empty["accuracy"] is None and empty["pass_at_k"] is None


def test_format_table_mentions_headline_numbers():
    report = {
        "model": "/m",
        "reference": "/r",
        **aggregate([_rec(True, 2, 0.5), _rec(False, 0, 0.1)], k=2),
        "k": 2,
        "kl_same_model": False,
        "seconds": 3.0,
        "timings": {"engine_start_s": 1.0, "per_prompt_s": 0.01},
    }
    table = format_table(report)
    assert "0.500 (greedy)" in table and "pass@2" in table and "KL to ref    0.3" in table


# ---------------------------------------------------------------- model path resolution


def _fake_model(d):
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def test_resolve_eval_model_layouts(tmp_path):
    hf = _fake_model(tmp_path / "plain")
    assert resolve_eval_model(str(hf)) == str(hf.resolve())
    ckpt = tmp_path / "ckpt"
    _fake_model(ckpt / "hf")
    assert resolve_eval_model(str(ckpt)) == str((ckpt / "hf").resolve())
    out = tmp_path / "train_out"
    _fake_model(out / "final")
    assert resolve_eval_model(str(out)) == str((out / "final").resolve())
    # idempotent: a resolved directory resolves to itself
    assert resolve_eval_model(resolve_eval_model(str(out))) == str((out / "final").resolve())
    # hub ids pass through unchanged
    assert resolve_eval_model("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"


def test_resolve_eval_model_errors_name_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"eval\.model_path.*nope.*does not exist"):
        resolve_eval_model(str(missing))
    with pytest.raises(ConfigError, match=r"model\.path'"):
        resolve_eval_model(str(missing), key="model.path")
    # a train.output_dir whose run has checkpoints but no final/: the error points at a checkpoint
    out = tmp_path / "unfinished"
    _fake_model(out / "ray" / "step_000050" / "hf")
    _fake_model(out / "ray" / "step_000100" / "hf")
    with pytest.raises(ConfigError, match=r"holds no model.*step_000100"):
        resolve_eval_model(str(out))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_eval_model(str(tmp_path / "afile"))


def test_same_model(tmp_path):
    a = _fake_model(tmp_path / "a")
    b = _fake_model(tmp_path / "b")
    (tmp_path / "link").symlink_to(a)
    assert same_model(str(a), str(tmp_path / "link"))
    assert not same_model(str(a), str(b))
    assert same_model("org/m", "org/m") and not same_model("org/m", "org/n")


# ---------------------------------------------------------------- reference log-probs


def test_sequence_logprobs_alignment_and_padding():
    """Batched, right-padded sums equal a per-sequence log_softmax over the response slice."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    responses = [[12, 13], [14, 15, 16, 17], [], [18]]
    got = sequence_logprobs(model, prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        want = sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(r))
        assert g == pytest.approx(want, abs=1e-4)
    assert got[2] == 0.0  # empty response
    assert all(math.isfinite(g) and g <= 0 for g in got)


def _tiny_qwen2(seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def test_kl_log_ratios_take_both_sides_from_transformers():
    """The engine's log-probs (here off by a made-up numerical gap) never enter the log-ratio."""
    pytest.importorskip("torch")
    policy, ref = _tiny_qwen2(0), _tiny_qwen2(1)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    responses = [[12, 13], [14, 15, 16, 17], []]
    logp_pi = sequence_logprobs(policy, prompts, responses)
    logp_ref = sequence_logprobs(ref, prompts, responses)
    offsets = [0.01, -0.02, 0.0]  # per-token gaps a second engine could add: 0.02, -0.08, 0 per sequence
    engine = [[lp / max(len(r), 1) + o for _ in r] for lp, r, o in zip(logp_pi, responses, offsets)]
    ratios, gaps = kl_log_ratios(policy, ref, prompts, responses, engine)
    assert ratios == pytest.approx([p - r for p, r in zip(logp_pi, logp_ref)], abs=1e-12)
    assert gaps == pytest.approx([0.02, -0.08, 0.0], abs=1e-5)
    assert ratios[2] == 0.0  # empty response
    # the model against a copy of itself (another object, same weights): exactly 0, whatever the engine says
    twin = _tiny_qwen2(0)
    ratios, gaps = kl_log_ratios(policy, twin, prompts, responses, engine)
    assert ratios == [0.0, 0.0, 0.0]
    assert gaps == pytest.approx([0.02, -0.08, 0.0], abs=1e-5)
