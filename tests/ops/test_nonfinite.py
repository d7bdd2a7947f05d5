"""NaN and inf in any input propagate to the output of the sequence or token that holds them, and
nowhere else; no op crashes, hangs or indexes out of range on them, on any backend. (A -inf logit
is a probability of 0, a legitimate input: it may only make targets infeasible.)"""

import math

import pytest
import torch

import omnifast
from omnifast.nn import MoE
from omnifast.ops import moe as moe_ops
from omnifast.ops.fsq import fsq_quantize
from omnifast.ops.linear_cross_entropy import linear_cross_entropy

from ..devices import device_for
from ..tolerances import value_and_grads

BACKENDS = ("torch", "cpu", "triton")
BAD = (math.nan, math.inf, -math.inf)


def spoil(tensor: torch.Tensor, index, value) -> torch.Tensor:
    spoiled = tensor.clone()
    spoiled[index] = value
    return spoiled


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctc(backend, bad):
    d = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(10, 2, 7, generator=gen).to(d), torch.randint(0, 6, (2, 3), generator=gen).to(d)
    for fn in (omnifast.ctc_loss_with_logits, lambda x, *a, **k: omnifast.ctc_loss(x.log_softmax(-1), *a, **k)):
        run = lambda x, fn=fn: fn(x, targets, [10, 10], [3, 3], blank=6, reduction="none", backend=backend)  # noqa: E731
        clean, clean_grad = value_and_grads(run, [logits], device=d)
        loss, grad = value_and_grads(run, [spoil(logits, (3, 0, 1), bad)], device=d)
        assert loss[1] == clean[1] and torch.equal(grad[:, 1], clean_grad[:, 1])  # the other sequence: untouched
        if not bad == -math.inf:
            assert not math.isfinite(loss[0]) and not torch.isfinite(grad[:, 0]).all()


def head(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 10, 8, generator=gen),
        torch.randn(7, 8, generator=gen),
        torch.randn(7, generator=gen),
        torch.randint(0, 6, (2, 3), generator=gen),
        torch.randint(0, 6, (2, 3), generator=gen),
    )


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ctc_and_ctc_dpo(backend, bad):
    d = device_for(backend)
    hidden, weight, bias, chosen, rejected = (t.to(d) for t in head())

    def linear(h):
        return omnifast.linear_ctc_loss(
            h, weight, bias, chosen, [10, 10], [3, 3], reduction="none", chunk_frames=4, backend=backend
        )

    clean, clean_grad = value_and_grads(linear, [hidden], device=d)
    loss, grad = value_and_grads(linear, [spoil(hidden, (0, 3, 1), bad)], device=d)
    assert not math.isfinite(loss[0]) and loss[1] == clean[1]
    assert not torch.isfinite(grad[0]).all() and torch.equal(grad[1], clean_grad[1])
    for sparse in (True, False):
        out = omnifast.ctc_dpo_loss(
            spoil(hidden, (0, 3, 1), bad),
            weight,
            bias,
            chosen,
            rejected,
            [10, 10],
            [3, 3],
            [3, 3],
            torch.zeros(2, device=d),
            torch.zeros(2, device=d),
            sparse=sparse,
            sft_weight=0.0 if sparse else 0.5,
            backend=backend,
        )
        assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 2])
def test_moe(backend, bad, top_k):
    d = device_for(backend)
    torch.manual_seed(2)
    moe = MoE(8, 12, experts=6, top_k=top_k, backend=backend).to(d)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(3)).to(d)
    clean = moe(x).output
    out = moe(spoil(x, (3, 2), bad))
    routing = out.routing
    assert int(routing.experts.min()) >= 0 and int(routing.experts.max()) < 6  # never out of range
    assert not torch.isfinite(out.output[3]).all()
    others = torch.arange(20, device=d) != 3
    torch.testing.assert_close(out.output[others], clean[others])
    route = moe_ops.route(spoil(x, (3, 2), bad), moe.gate.weight, 2, backend=backend)
    assert int(route.counts.sum()) == 40 and sorted(route.order.tolist()) == list(range(40))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsq(backend):
    d = device_for(backend)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(4)).to(d)
    z[1, 2], z[3, 0], z[4, 1] = math.nan, math.inf, -math.inf
    codes, indices = fsq_quantize(z, [8, 5, 5, 5], backend=backend)
    assert torch.isnan(codes[1, 2]) and int(indices[1]) == -1  # a NaN row has no code
    assert torch.isfinite(codes[[0, 2, 3, 4, 5]]).all()  # +-inf saturate to the end levels
    assert ((indices[[0, 2, 3, 4, 5]] >= 0) & (indices[[0, 2, 3, 4, 5]] < 8 * 5 * 5 * 5)).all()


def test_linear_cross_entropy_and_greedy_decoding():
    hidden, weight, bias, _, _ = head(5)
    flat = spoil(hidden.reshape(20, 8), (4, 0), math.nan)
    loss = linear_cross_entropy(flat, weight, bias, torch.randint(0, 7, (20,)))
    assert torch.isnan(loss)
    units = omnifast.ctc_greedy_decode(spoil(torch.randn(2, 10, 7), (0, 3, 2), math.nan), [10, 10], blank=6)
    assert len(units) == 2 and all(0 <= u < 7 for row in units for u in row)
