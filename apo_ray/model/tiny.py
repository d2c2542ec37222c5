"""The project's own tiny model: a char-level Qwen2 warm-started on arithmetic.

The demo (``model.path: tiny``) and the tests use it, so nothing is downloaded.
`build_tiny_model` writes a Hugging Face model directory (safetensors, float32)
that transformers and vLLM(-CPU) both load:

- tokenizer: byte-level BPE with no merges, built with `tokenizers`: every byte
  (so every ASCII char, every digit) is one token, plus ``<|endoftext|>`` (EOS) and
  ``<|pad|>``; no BOS, no chat template. It mirrors the Qwen2 tokenizer pipeline
  (NFC, Qwen2 split regex, byte-level) because transformers 5 loads any
  ``model_type: qwen2`` directory with `Qwen2Tokenizer`, which rebuilds that
  pipeline from the vocabulary: this way tokenizer.json and AutoTokenizer agree.
- model: Qwen2ForCausalLM, hidden 128, 2 layers, 2 heads of dim 64 (vLLM's CPU
  attention rejects head_dim 16), 1 KV head, untied embeddings (~0.56 M params).
- warm start (``sft=True``): a plain seeded torch loop, in float64, on arith train problems
  (``"37+45="`` -> ``"82<|endoftext|>"``, loss on completion tokens only): a fixed 3000 AdamW
  steps, linear warm-up then cosine decay to 0, from a demonstrator that is wrong on purpose: each
  time a problem is drawn, its answer is off by one with a probability that rises with the right
  answer, from `wrong_frac` = 0.3 at 0 to `wrong_frac_max` = 0.95 at 198. Trained to convergence,
  the model answers small sums greedily right and large ones wrong: held-out greedy ~0.18, sampled
  ~0.33, a settled model that RL can still improve a lot, and gradually: as RL shrinks the model's
  "+1" habit, the sum below which greedy answers are right moves up through the problems, so
  held-out accuracy climbs over hundreds of steps at the paper's lr (1e-6) instead of flipping for
  all problems at once (which a single error rate does, measured: 0.14 -> 0.86 within 50 steps at
  lr 1e-4). Settled matters: the same recipe lands at the same accuracy on any machine
  (`python jobs/bench.py warmstart` builds it with this CPU's kernels and with AVX2's). A clean run
  stopped half-way, as this recipe used to be, is not: float rounding that differs between CPUs
  grows from 1e-16 to O(1) in the weights within ~200 steps (measured), and the step where accuracy
  takes off, so where a half-way stop lands, moves with it (0.470 on one machine, 0.325 on another).
  The measured greedy / sampled accuracies on held-out problems go to ``tiny_recipe.json`` in
  the model directory.

`ensure_tiny_model` builds once per recipe into a cache (``$APO_RAY_CACHE`` or
``~/.cache/apo_ray``), atomically and safely under concurrent callers;
`apo_ray.model.resolve_model` maps ``"tiny"`` to that directory.

Run: ``apo-ray make-tiny-model OUT [--no-sft]``; ``model.path: tiny`` builds it on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_ray.data.arith import arith_answer, arith_problems
from apo_ray.rewards.arith import arith_reward

# Bump when the build changes in a way the recipe fields do not capture (invalidates caches).
TINY_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
RECIPE_FILE = "tiny_recipe.json"
# The Qwen2 pre-tokenizer regex (transformers' Qwen2Tokenizer); with no merges it only
# decides where byte-level pieces split, so each byte stays one token anyway.
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built model (hashed for the cache key)."""

    sft: bool = True
    seed: int = 0
    # architecture
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim = hidden_size / heads must be 64 for vLLM-CPU
    num_key_value_heads: int = 1
    max_position_embeddings: int = 2048  # room for the default config's 256 + 1024 tokens
    # warm-start SFT on arith (train split only): a fixed number of steps, a linear lr warm-up,
    # then cosine decay to 0, trained to convergence (see the module doc for why not half-way).
    digits: int = 2
    ops: str = "+"
    num_train: int = 4800  # SFT problems
    batch_size: int = 64
    steps: int = 3000
    lr: float = 2e-3  # peak
    warmup_steps: int = 100
    weight_decay: float = 0.0
    # Init and SFT precision (the model is saved in float32). float64 delays, but does not prevent,
    # the divergence between machines' kernels (AVX2 vs AVX-512, MKL, oneDNN): measured, the weights
    # of the two builds are 1e-9 apart at step 100 and O(1) apart by step 200. What makes the recipe
    # land at the same accuracy is that it trains to convergence; float64 is what was measured so.
    train_dtype: str = "float64"
    # The demonstrator is wrong this often (at answer 0 when `wrong_frac_max` is set): each time a
    # problem is drawn, its answer is off by one (answer + 1) with this probability. Trained to
    # convergence, the model samples the right answer about as often as the demonstrator gave it and
    # answers greedily with the likelier one: a settled model (the same on any machine) that RL can
    # still improve a lot.
    wrong_frac: float = 0.3
    # If set, the demonstrator's error rate is not one number but rises linearly with the right
    # answer, from `wrong_frac` at answer 0 to `wrong_frac_max` at the largest answer the task can
    # have: the settled model answers small sums right and large ones wrong, and RL has a boundary to
    # move across the problems rather than one global bias to flip.
    wrong_frac_max: float | None = 0.95
    # measurement (recorded, not a stopping rule): held-out eval problems of the arith task
    num_eval: int = 1000
    eval_seed: int = 0
    eval_max_tokens: int = 8


def make_recipe(**kwargs: Any) -> TinyRecipe:
    """A `TinyRecipe` from keyword overrides; an unknown key raises with the valid ones."""
    names = {f.name for f in dataclasses.fields(TinyRecipe)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"tiny model: unknown recipe key(s) {unknown}; valid: {sorted(names)}")
    recipe = TinyRecipe(**kwargs)
    if recipe.hidden_size % recipe.num_attention_heads or recipe.hidden_size // recipe.num_attention_heads != 64:
        raise ValueError("tiny model: hidden_size / num_attention_heads must be 64 (vLLM-CPU attention)")
    for key in ("wrong_frac", "wrong_frac_max"):
        value = getattr(recipe, key)
        if value is None and key == "wrong_frac_max":  # no ramp: one error rate for every problem
            continue
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"tiny model: {key} must be in [0, 1), got {value!r}")
    if recipe.train_dtype not in ("float32", "float64"):
        raise ValueError(f"tiny model: train_dtype must be 'float32' or 'float64', got {recipe.train_dtype!r}")
    return recipe


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """The byte-level, merge-free tokenizer as a transformers fast tokenizer (vocab 258: 256 bytes, EOS, PAD)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # id i is byte i: order the byte-level alphabet by the byte each symbol stands for.
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=2048,
    )


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable-unicode table, the alphabet of tokenizers' ByteLevel.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ----------------------------------------------------------------------------- build


def build_tiny_model(out_dir: str | os.PathLike, *, sft: bool = True, seed: int = 0, **recipe: Any) -> Path:
    """Build the tiny model into `out_dir` (created; existing files are overwritten).

    Args:
        out_dir: target directory.
        sft: warm-start on arith (~tens of seconds on 2 cores); False: random init (seconds).
        seed: seeds the init and the SFT batches.
        **recipe: overrides of `TinyRecipe` fields (architecture, SFT steps, lr, ...).
    Returns:
        The model directory, loadable by `AutoModelForCausalLM` / `AutoTokenizer` / `vllm.LLM`.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rec = make_recipe(sft=sft, seed=seed, **recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(min(old_threads, 2))  # a 0.5 M-param model gains nothing from more
    try:
        torch.manual_seed(rec.seed)
        config = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=rec.hidden_size,
            intermediate_size=rec.intermediate_size,
            num_hidden_layers=rec.num_hidden_layers,
            num_attention_heads=rec.num_attention_heads,
            num_key_value_heads=rec.num_key_value_heads,
            max_position_embeddings=rec.max_position_embeddings,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            dtype="float32",
        )
        train_dtype = getattr(torch, rec.train_dtype)
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(train_dtype)  # the init is drawn in the training precision
        try:
            model = Qwen2ForCausalLM(config).to(train_dtype)
        finally:
            torch.set_default_dtype(old_dtype)
        info: dict[str, Any] = {"recipe": dataclasses.asdict(rec), "version": TINY_VERSION}
        if rec.sft:
            t0 = time.perf_counter()
            info.update(sft_arith(model, tok, rec))
            info["sft_seconds"] = round(time.perf_counter() - t0, 1)
        model = model.float()  # shipped in float32; accuracies are measured on what is shipped
        if rec.sft:
            evals = arith_problems("test", rec.num_eval, seed=rec.eval_seed, digits=rec.digits, ops=rec.ops)
            gen = torch.Generator().manual_seed(rec.seed + 1)
            info["accuracy_greedy"] = arith_accuracy(model, tok, evals, greedy=True, max_tokens=rec.eval_max_tokens)
            info["accuracy_sampled"] = arith_accuracy(
                model, tok, evals, greedy=False, max_tokens=rec.eval_max_tokens, generator=gen
            )
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(out)
    finally:
        torch.set_num_threads(old_threads)
    tok.save_pretrained(out)
    (out / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def wrong_prob(answer: int, rec: TinyRecipe) -> float:
    """How often the demonstrator is off by one on a problem whose right answer is `answer`."""
    if rec.wrong_frac_max is None:
        return rec.wrong_frac
    hi = 10**rec.digits - 1  # |answer| is largest at a corner of the operand square
    largest = max(abs(arith_answer(a, op, b)) for op in rec.ops for a in (0, hi) for b in (0, hi)) or 1
    return rec.wrong_frac + (rec.wrong_frac_max - rec.wrong_frac) * min(1.0, abs(answer) / largest)


def lr_factor(step: int, rec: TinyRecipe) -> float:
    """The lr multiplier of optimizer step `step` (0-based): linear warm-up, then cosine decay to 0 at `rec.steps`."""
    if step < rec.warmup_steps:
        return (step + 1) / rec.warmup_steps
    span = max(1, rec.steps - rec.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - rec.warmup_steps) / span)))


def _rms_norm_forward(self, hidden_states):
    # Qwen2RMSNorm.forward without its cast to float32.
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_forward(self, x, position_ids):
    # Qwen2RotaryEmbedding.forward with the angles in x's dtype instead of float32.
    import torch

    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


@contextlib.contextmanager
def _whole_model_in_its_dtype(model):
    """transformers' Qwen2 computes RMSNorm and the rotary angles in float32 whatever the model's dtype.

    Trained in float64, those float32 steps would leave rounding differences of ~1e-7 between
    machines (float32 rsqrt/sin/cos differ between AVX2 and AVX-512 kernels), which training
    amplifies; inside this context both run in the model's dtype. The patch is per instance and
    undone on exit (the saved model is plain Qwen2).
    """
    import types

    patched = []
    for module in model.modules():
        name = type(module).__name__
        fn = {"Qwen2RMSNorm": _rms_norm_forward, "Qwen2RotaryEmbedding": _rotary_forward}.get(name)
        if fn is not None:
            module.forward = types.MethodType(fn, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def sft_arith(model, tok, rec: TinyRecipe, probe: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """Supervised warm start on arith train problems: `rec.steps` AdamW steps on the lr schedule `lr_factor`.

    Args:
        probe: called as ``probe(step, model)`` after every step (experiments; not part of the recipe).
    Returns:
        {"steps": steps run, "final_loss": mean of the last 20 losses}.
    """
    import random

    import torch

    problems = arith_problems("train", rec.num_train, seed=rec.seed, digits=rec.digits, ops=rec.ops)
    seqs = []  # per problem: (ids, labels) with the right answer, then with the demonstrator's wrong one
    wrong_P = [wrong_prob(int(p["answer"]), rec) for p in problems]
    for p in problems:
        q = _encode(tok, p["question"])
        pair = []
        for answer in (p["answer"], str(int(p["answer"]) + 1)):
            a = _encode(tok, answer) + [tok.eos_token_id]
            pair.append((q + a, [-100] * len(q) + a))  # loss on completion tokens only
        seqs.append(pair)
    wrong = random.Random(f"apo-ray-tiny-sft-wrong-{rec.seed}")
    rng = random.Random(f"apo-ray-tiny-sft-{rec.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=rec.lr, weight_decay=rec.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, rec))
    losses: list[float] = []
    with _whole_model_in_its_dtype(model):
        for step in range(1, rec.steps + 1):
            model.train()
            picked = rng.sample(range(len(seqs)), rec.batch_size)
            batch = [seqs[i][wrong.random() < wrong_P[i]] for i in picked]
            width = max(len(ids) for ids, _ in batch)
            ids_BT = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            labels_BT = torch.full((len(batch), width), -100, dtype=torch.long)
            mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, labels) in enumerate(batch):  # right padding: positions stay 0..len-1
                ids_BT[i, : len(ids)] = torch.tensor(ids)
                labels_BT[i, : len(ids)] = torch.tensor(labels)
                mask_BT[i, : len(ids)] = 1
            # Our own cross-entropy: transformers' loss casts the logits to float32.
            logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
            loss = torch.nn.functional.cross_entropy(
                logits_BTV[:, :-1].flatten(0, 1), labels_BT[:, 1:].flatten(), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if probe is not None:
                probe(step, model)
    model.eval()
    tail = losses[-20:]
    return {"steps": rec.steps, "final_loss": round(sum(tail) / max(1, len(tail)), 4)}


def arith_accuracy(
    model, tok, problems: list[dict], *, greedy: bool, max_tokens: int = 8, temperature: float = 1.0, generator=None
) -> float:
    """Fraction of `problems` answered correctly by `model` (transformers; prompts batched by length, no padding)."""
    import torch

    by_len: dict[int, list[tuple[list[int], str]]] = {}
    for p in problems:
        ids = _encode(tok, p["question"])
        by_len.setdefault(len(ids), []).append((ids, p["answer"]))
    correct = 0
    model.eval()
    with torch.no_grad():
        for _, group in sorted(by_len.items()):
            ids_BT = torch.tensor([ids for ids, _ in group])
            done_B = torch.zeros(len(group), dtype=torch.bool)
            out_BT = torch.empty((len(group), 0), dtype=torch.long)
            for _ in range(max_tokens):  # no KV cache: sequences are a dozen tokens
                logits_BV = model(input_ids=ids_BT).logits[:, -1, :].float()
                if greedy:
                    next_B = logits_BV.argmax(-1)
                else:
                    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
                    next_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
                next_B = torch.where(done_B, torch.full_like(next_B, tok.eos_token_id), next_B)
                out_BT = torch.cat([out_BT, next_B[:, None]], dim=1)
                ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
                done_B |= next_B == tok.eos_token_id
                if done_B.all():
                    break
            for row, (_, answer) in zip(out_BT.tolist(), group):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id)]
                correct += arith_reward(tok.decode(row, skip_special_tokens=True), answer) >= 1.0
    return correct / max(1, len(problems))


# ----------------------------------------------------------------------------- cache


def tiny_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else ``$APO_RAY_CACHE``, else ``~/.cache/apo_ray``."""
    root = cache_dir or os.environ.get("APO_RAY_CACHE") or Path.home() / ".cache" / "apo_ray"
    return Path(root).expanduser()


def recipe_hash(recipe: TinyRecipe) -> str:
    blob = json.dumps({"version": TINY_VERSION, **dataclasses.asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None, **recipe: Any) -> Path:
    """The tiny model of `recipe` (`TinyRecipe` overrides), built on first use and cached.

    The directory is ``<cache root>/tiny-<hash of recipe + version>``. Concurrent
    callers (tests, Ray workers, the demo) serialise on a ``fcntl.flock`` lock file;
    the build goes to a temporary sibling directory that is renamed into place, so
    a reader never sees a half-written model.
    """
    rec = make_recipe(**recipe)
    root = tiny_cache_root(cache_dir)
    final = root / f"tiny-{recipe_hash(rec)}"
    if (final / RECIPE_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / RECIPE_FILE).is_file():  # another process built it while we waited
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
            try:
                build_tiny_model(tmp, **dataclasses.asdict(rec))
                tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with Ray workers
                if final.exists():  # a stale partial directory (cannot happen via rename, but be safe)
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
