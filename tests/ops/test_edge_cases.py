"""Edge cases every backend treats alike: NaN and inf tokens route to k distinct experts, +inf
log-probabilities poison their sequence the same way, empty batches give empty results, and bad
devices, huge lengths and huge codebooks are clear errors; the C++ kernels give the same bits
with 1 and 2 threads."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnifast
from omnifast.nn import MoE
from omnifast.ops import moe as moe_ops
from omnifast.ops.fsq import fsq_quantize

BACKENDS = ("torch", "cpu", "triton")


def same_values(a, b):
    return (
        a.shape == b.shape
        and torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-5, atol=1e-6)
    )


@given(tokens=st.integers(0, 9), experts=st.integers(2, 7), data=st.data())
def test_route_agrees_across_backends_with_nan_inf_and_empty_batches(tokens, experts, data):
    k = data.draw(st.integers(1, experts))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=gen)
    for row in range(tokens):
        x[row, 0] = data.draw(st.sampled_from([0.5, math.nan, math.inf, -math.inf]))
    gate = torch.randn(experts, 8, generator=gen)
    results = [moe_ops.route(x, gate, k, backend=b) for b in BACKENDS]
    for r in results:
        assert r.experts.shape == (tokens, k)
        for row in r.experts.tolist():
            assert len(set(row)) == k and all(0 <= e < experts for e in row)  # never one expert twice
    for r in results[1:]:
        assert torch.equal(r.experts, results[0].experts)
        assert same_values(r.weights, results[0].weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctc_with_plus_inf_log_probs_is_nan_on_every_backend(backend):
    log_probs = torch.randn(10, 2, 5).log_softmax(-1)
    log_probs[3, 0, 2] = math.inf
    targets = torch.tensor([[1, 2], [3, 1]])
    for zero_infinity in (False, True):
        loss = omnifast.ctc_loss(
            log_probs, targets, [10, 10], [2, 2], backend=backend, reduction="none", zero_infinity=zero_infinity
        )
        assert math.isnan(loss[0]) and math.isfinite(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_give_empty_results(backend):
    weight, bias = torch.randn(7, 4), torch.zeros(7)
    empty = torch.zeros(0, 2, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    chosen, rejected = omnifast.ops.reference_logps(
        torch.randn(0, 5, 4), weight, bias, empty, empty, none, none, none, backend=backend
    )
    assert chosen.shape == rejected.shape == (0,)
    for top_k, split in ((2, 1), (None, 4)):
        moe = MoE(8, 16, 16, experts=4, top_k=top_k, split_tokens=split, backend=backend)
        x = torch.randn(0, 8, requires_grad=True)
        out = moe(x).output
        assert out.shape == (0, 16 // split)
        out.sum().backward()
        assert x.grad.shape == (0, 8)
    loss = omnifast.linear_ctc_loss(
        torch.randn(2, 5, 0),
        torch.randn(7, 0),
        torch.zeros(7),
        torch.tensor([[1, 2], [1, 1]]),
        [5, 5],
        [2, 2],
        backend=backend,
    )
    assert math.isfinite(float(loss))


def test_bad_devices_lengths_and_sizes_are_named():
    log_probs = torch.randn(10, 2, 5).log_softmax(-1)
    targets = torch.tensor([[1, 2], [3, 1]])
    with pytest.raises(ValueError, match=r"input_lengths must be in \[0, 2\*\*63\)"):
        omnifast.ctc_loss(log_probs, targets, [2**64, 10], [2, 2])
    with pytest.raises(ValueError, match="input_lengths is on the meta device"):
        omnifast.ctc_loss(log_probs, targets, torch.tensor([10, 10], device="meta"), [2, 2])
    with pytest.raises(ValueError, match="log_probs is on the meta device"):
        omnifast.ctc_loss(log_probs.to("meta"), targets, [10, 10], [2, 2])
    with pytest.raises(ValueError, match="gate_weight is on the meta device"):
        moe_ops.route(torch.randn(3, 8), torch.randn(6, 8, device="meta"), 2)
    with pytest.raises(ValueError, match=r"gate_bias must be \(6,\)"):
        moe_ops.route(torch.randn(3, 8), torch.randn(6, 8), 2, gate_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="x must end in the hidden size 8"):
        MoE(8, 16, experts=4, top_k=2)(torch.tensor(1.0))
    for backend in ("torch", "cpu"):
        with pytest.raises(ValueError, match="indices are int64"):
            fsq_quantize(torch.randn(2, 9), [2**10] * 9, backend=backend)
    w, b = torch.randn(7, 4), torch.zeros(7)
    for name, value in (("sft_weight", math.nan), ("beta", math.inf), ("beta", -1.0)):
        with pytest.raises(ValueError, match=name):
            omnifast.ctc_dpo_loss(
                torch.randn(1, 5, 4),
                w,
                b,
                torch.tensor([[1]]),
                torch.tensor([[2]]),
                [5],
                [1],
                [1],
                torch.zeros(1),
                torch.zeros(1),
                **{name: value},
            )
    with pytest.raises(ValueError, match="jitter must be finite"):
        MoE(8, 16, experts=4, top_k=2, jitter=math.nan)


def bits(fn):
    out = fn()
    return [t.detach().clone() for t in (out if isinstance(out, tuple) else (out,))]


def test_cpu_kernels_give_the_same_bits_with_one_and_two_threads():
    """The C++ kernels parallelise over independent rows and reduce in a fixed order, so their
    bits do not depend on the thread count (torch's own matrix products and sums do: the split of
    a reduction over threads changes its rounding, see ``omnifast/__init__.py``)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 24, 50, generator=gen)
    targets = torch.randint(0, 49, (24, 40), generator=gen)
    lengths, target_lengths = torch.randint(200, 301, (24,), generator=gen), torch.randint(5, 41, (24,), generator=gen)
    x = torch.randn(5000, 16, generator=gen)
    gate = torch.randn(8, 16, generator=gen)
    z = torch.randn(4000, 4, generator=gen)

    def ctc():
        leaf = logits.clone().requires_grad_()
        loss = omnifast.ctc_loss_with_logits(
            leaf, targets, lengths, target_lengths, blank=49, backend="cpu", reduction="none"
        )
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss, grad

    def route():
        r = moe_ops.route(x, gate, 2, backend="cpu")
        y = torch.randn(5000 * 2, 16, generator=torch.Generator().manual_seed(1))
        return r.weights, r.experts.double(), r.order.double(), moe_ops.unpermute(y, r)

    def fsq():
        codes, indices = fsq_quantize(z, [8, 5, 5, 5], backend="cpu")
        return codes, indices.double()

    threads = torch.get_num_threads()
    try:
        for fn in (ctc, route, fsq):
            torch.set_num_threads(1)
            one = bits(fn)
            torch.set_num_threads(2)
            two = bits(fn)
            assert all(torch.equal(a, b) for a, b in zip(one, two)), fn.__name__
    finally:
        torch.set_num_threads(threads)
