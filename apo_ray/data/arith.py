"""The synthetic arithmetic task used by the demo, the tiny model and the tests.

Problems look like ``"37+45="`` with answer ``"82"``. They are deterministic from
a seed (string-seeded `random.Random`, identical on every machine), and the
train and eval splits are disjoint by construction: a problem belongs to the
eval split iff a hash of its text falls in a fixed 20 % bucket, so no eval
problem is ever drawn for training (nor for the tiny model's warm-start SFT).
"""

from __future__ import annotations

import hashlib
import random

EVAL_SPLITS = ("eval", "test", "validation")


def is_eval_problem(question: str) -> bool:
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) % 5 == 0


def arith_answer(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"arith: unsupported operator {op!r} (use any of '+-*')")


def arith_problems(split: str, num: int, *, seed: int = 0, digits: int = 2, ops: str = "+") -> list[dict]:
    """Return `num` distinct problems ``{"question": "12+34=", "answer": "46"}`` of `split`.

    Args:
        split: "train", or one of "eval"/"test"/"validation" (the held-out bucket).
        num: number of problems.
        seed: the same seed gives the same problems on any machine.
        digits: operands are drawn uniformly from [0, 10**digits).
        ops: operators to draw from, any of "+-*".
    """
    if digits < 1 or not ops:
        raise ValueError("arith: need digits >= 1 and at least one operator")
    for op in ops:
        arith_answer(1, op, 1)
    want_eval = split in EVAL_SPLITS
    space = (10**digits) ** 2 * len(set(ops))
    if num > space // (5 if want_eval else 2):
        raise ValueError(
            f"arith: {num} distinct {split} problems requested, only ~{space // 5} exist at digits={digits}"
        )
    rng = random.Random(f"apo-ray-arith-{seed}-{digits}-{ops}")
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < num:
        a, b, op = rng.randrange(10**digits), rng.randrange(10**digits), rng.choice(ops)
        q = f"{a}{op}{b}="
        if q in seen or is_eval_problem(q) != want_eval:
            continue
        seen.add(q)
        out.append({"question": q, "answer": str(arith_answer(a, op, b))})
    return out
