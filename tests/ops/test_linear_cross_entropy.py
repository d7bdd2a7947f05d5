"""Chunked fused linear cross-entropy against F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from omnifast.ops.linear_cross_entropy import linear_cross_entropy

from ..tolerances import assert_close, value_and_grads


def reference(h, w, b, targets, reduction="mean", chunk_rows=None):
    return F.cross_entropy(F.linear(h, w, b), targets, ignore_index=-100, reduction=reduction)


@given(
    rows=st.integers(1, 40),
    width=st.integers(1, 12),
    classes=st.integers(1, 30),
    chunk=st.integers(1, 50),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignored=st.floats(0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_matches_full_logits(rows, width, classes, chunk, bias, reduction, ignored, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(classes, width, generator=gen, dtype=torch.float64)
    b = torch.randn(classes, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, classes, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < ignored] = -100
    if (targets == -100).all() and reduction == "mean":
        targets[0] = 0  # torch's mean over no rows is NaN; ours is 0
    ours = value_and_grads(
        linear_cross_entropy,
        [hidden, weight, b],
        targets,
        device="cpu",
        probe=True,
        reduction=reduction,
        chunk_rows=chunk,
    )
    theirs = value_and_grads(reference, [hidden, weight, b], targets, device="cpu", probe=True, reduction=reduction)
    for name, a, r in zip(("loss", "grad hidden", "grad weight", "grad bias"), ours, theirs):
        assert_close(a.double(), r, torch.float64, name)  # float64 accumulates in float64


def test_bf16_hidden_and_no_grad():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 16, generator=gen), torch.randn(50, 16, generator=gen)
    targets = torch.randint(0, 50, (64,), generator=gen)
    exact = reference(hidden, weight, None, targets)
    ours = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), None, targets, chunk_rows=7)
    assert ours.dtype == torch.float32
    assert abs(ours - exact) < 0.05 * exact
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, targets), exact)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(targets=torch.tensor([0, 5])), ValueError, "targets"),
        (dict(targets=torch.tensor([0.0, 1.0])), TypeError, "targets"),
        (dict(weight=torch.zeros(5, 3)), ValueError, "weight"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(hidden=torch.zeros(3, 4)), ValueError, "hidden"),
    ],
)
def test_bad_input(change, error, match):
    args = dict(hidden=torch.zeros(2, 4), weight=torch.zeros(5, 4), bias=None, targets=torch.tensor([0, 1]))
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)
