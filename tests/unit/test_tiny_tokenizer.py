"""The tiny model's tokenizer: byte-level, one token per char/digit, EOS/PAD set, same ids however it is loaded."""

from __future__ import annotations

import string

import pytest

from apo_ray.data.arith import arith_problems
from apo_ray.model.tiny import (
    EOS_TOKEN,
    PAD_TOKEN,
    TinyRecipe,
    build_tokenizer,
    lr_factor,
    make_recipe,
    recipe_hash,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_special_tokens(tok):
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 256
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 257
    assert tok.bos_token is None
    assert len(tok) == 258
    # No BOS / EOS added around plain text: prompts are raw strings.
    assert tok("1+2=")["input_ids"] == [ord(c) for c in "1+2="]


def test_digits_and_ascii_are_single_tokens(tok):
    for ch in string.printable:
        ids = tok(ch, add_special_tokens=False)["input_ids"]
        assert ids == [ord(ch)], ch  # id i is byte i
    assert tok.convert_ids_to_tokens(tok("0123456789")["input_ids"]) == list("0123456789")


@pytest.mark.parametrize("text", ["37+45=82", "Hello, world!\n\tTabs  and  spaces ", string.printable, "a" * 300])
def test_round_trip_ascii(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_round_trip_arith_and_eos(tok):
    for p in arith_problems("train", 50, seed=3, digits=3, ops="+-*"):
        text = p["question"] + p["answer"]
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode([tok.eos_token_id]) == EOS_TOKEN
    assert tok(EOS_TOKEN)["input_ids"] == [tok.eos_token_id]


def test_non_ascii_round_trips_as_bytes(tok):
    text = "naïve 中文 ✓"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_saved_tokenizer_loads_identically(tok, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    # transformers 5 picks the class from config.json's model_type (Qwen2Tokenizer for the
    # model dir), else from tokenizer.json: both must give the same ids as the raw file.
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "12+34=46 x\ny é"
    assert loaded(text)["input_ids"] == raw.encode(text).ids == tok(text)["input_ids"]
    assert loaded.eos_token_id == 256 and loaded.pad_token_id == 257


def test_recipe_hash_and_validation():
    assert recipe_hash(make_recipe()) == recipe_hash(TinyRecipe())
    assert recipe_hash(make_recipe(seed=1)) != recipe_hash(make_recipe())
    with pytest.raises(TypeError, match="unknown recipe key"):
        make_recipe(stepz=3)
    with pytest.raises(ValueError, match="64"):
        make_recipe(num_attention_heads=8)


def test_sft_lr_schedule_warms_up_then_decays_to_zero():
    rec = make_recipe(steps=1100, warmup_steps=100)
    assert lr_factor(0, rec) == pytest.approx(0.01) and lr_factor(99, rec) == pytest.approx(1.0)
    assert lr_factor(100, rec) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(600, rec) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(1099, rec) == pytest.approx(0.0, abs=1e-4) and lr_factor(1100, rec) == 0.0
    factors = [lr_factor(s, rec) for s in range(100, 1100)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # never rises after the warm-up


def test_ensure_tiny_model_builds_once(tmp_path):
    from apo_ray.model import resolve_model
    from apo_ray.model.tiny import ensure_tiny_model

    first = ensure_tiny_model(tmp_path, sft=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model(str(tmp_path), sft=False)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.name.startswith("tiny-") and (first / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # no temp dirs left
    assert ensure_tiny_model(tmp_path, sft=False, seed=1) != first
    assert resolve_model("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"
