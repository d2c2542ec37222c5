"""The learner's statistic chunking: bounded memory, and the same numbers as one row at a time."""

from __future__ import annotations

import torch

from apo_ray.algo import token_entropy
from apo_ray.train.learner import STAT_CHUNK_ELEMS, stat_rows_per_chunk


def test_rows_per_chunk_bounds_the_copy():
    assert stat_rows_per_chunk((64, 14, 258)) == STAT_CHUNK_ELEMS // (14 * 258)  # the demo: one chunk
    assert stat_rows_per_chunk((64, 14, 258)) >= 64
    assert stat_rows_per_chunk((8, 1280, 152064)) == 1  # a 7B row alone exceeds the budget: one at a time
    assert stat_rows_per_chunk((4, 10, 10), max_elems=250) == 2  # 2 x 100 <= 250 < 3 x 100
    assert stat_rows_per_chunk((4, 0, 10)) >= 1


def test_chunked_entropy_equals_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(5, 7, 11, generator=g) * 3
    rows = torch.cat([token_entropy(row[None, :-1]) for row in logits_BTV])
    for per in (1, 2, 5):
        chunked = torch.cat([token_entropy(c[:, :-1]) for c in logits_BTV.split(per)])
        assert torch.equal(chunked, rows)  # bit for bit: each position's reduction is the same
