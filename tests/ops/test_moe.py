"""The MoE ops on the C++ and Triton (interpreted) backends against the torch reference: routing
(every field, and the gradient to the logits through weights, probs and the z-loss), permute,
the weighted combine and the grouped expert MLP, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifast.ops import moe

from ..devices import device_for
from ..tolerances import assert_close

KERNELS = ["cpu", "triton"]
ROUTE_FIELDS = ("probs", "weights", "experts", "counts", "offsets", "order", "position", "balance_loss", "z_loss")


def separated_logits(tokens, experts, gen):
    """Logits whose probabilities are far apart, so float rounding cannot swap a top-k choice."""
    ranks = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).float()
    return ranks * 0.5 + 0.01 * torch.rand(tokens, experts, generator=gen)


def routed(backend, x, gate, top_k, normalize=True):
    """The routing on the backend's test device (tests/devices.py), fields and gradients on the CPU."""
    device = device_for(backend)
    x, gate = x.clone().to(device).requires_grad_(), gate.clone().to(device).requires_grad_()
    r = moe.route(x, gate, top_k, normalize=normalize, backend=backend)
    probe = torch.linspace(-1, 1, r.weights.numel(), device=device).view_as(r.weights)
    loss = (r.weights * probe).sum() + 0.3 * r.balance_loss + 0.1 * r.z_loss + (r.probs[:, :1] ** 2).sum()
    grads = [g.cpu() for g in torch.autograd.grad(loss, [x, gate])]
    fields = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in r.__dict__.items()}
    return moe.Routing(**fields), grads


@pytest.mark.gpu_check(5)
@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=25)
@given(
    tokens=st.integers(1, 70),
    experts=st.integers(1, 9),
    k=st.integers(1, 9),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_route_matches_reference(backend, tokens, experts, k, normalize, seed):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    # x = one-hot rows and an identity-like gate give logits we choose exactly
    logits = separated_logits(tokens, experts, gen)
    x, gate = logits, torch.eye(experts)
    ours, our_grads = routed(backend, x, gate, k, normalize)
    ref, ref_grads = routed("torch", x, gate, k, normalize)
    assert ours.backend == backend
    for field in ROUTE_FIELDS:
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field), msg=field)
    for a, b in zip(our_grads, ref_grads):
        assert_close(a, b, torch.float32, "gradient")


@pytest.mark.parametrize("backend", KERNELS)
def test_route_ties_and_one_expert_taking_everything(backend):
    r = moe.route(torch.ones(40, 3), torch.zeros(5, 3), 2, backend=backend)  # all logits equal
    assert r.experts.tolist() == [[0, 1]] * 40
    assert r.counts.tolist() == [40, 40, 0, 0, 0]
    gate = torch.zeros(4, 3)
    gate[2] = 1.0
    r = moe.route(torch.rand(33, 3) + 0.1, gate, 1, backend=backend)
    assert r.counts.tolist() == [0, 0, 33, 0] and r.offsets.tolist() == [0, 0, 0, 33, 33]
    assert torch.equal(r.order, torch.arange(33))


@pytest.mark.parametrize("backend", KERNELS)
def test_route_sort_spans_many_blocks(backend):
    gen = torch.Generator().manual_seed(3)
    logits = separated_logits(3000, 6, gen)  # 6000 slots: several blocks of the Triton sort
    ours = moe.route(logits, torch.eye(6), 2, backend=backend)
    ref = moe.route(logits, torch.eye(6), 2, backend="torch")
    for field in ("experts", "counts", "offsets", "order", "position"):
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field


def combine_case(tokens, experts, k, width, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = moe.route(separated_logits(tokens, experts, gen), torch.eye(experts), k, backend="torch")
    y = torch.randn(tokens * k, width, generator=gen, dtype=dtype)
    x = torch.randn(tokens, width, generator=gen, dtype=dtype)
    return r, x, y


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=20)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 7),
    k=st.integers(1, 7),
    width=st.integers(1, 1100),
    seed=st.integers(0, 2**16),
)
def test_permute_and_unpermute_match_reference(backend, tokens, experts, k, width, seed):
    k = min(k, experts)
    r, x, y = combine_case(tokens, experts, k, width, seed)
    ours_r = moe.Routing(**{**r.__dict__, "backend": backend})
    results = []
    for routing in (ours_r, r):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        w = routing.weights.detach().clone().requires_grad_()
        routing = moe.Routing(**{**routing.__dict__, "weights": w})
        permuted = moe.permute(xs, routing)
        out = moe.unpermute(ys, routing)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        loss = (out * probe).sum() + (permuted * permuted.detach().cos()).sum()
        results.append([permuted, out, *torch.autograd.grad(loss, [xs, ys, w])])
    for a, b in zip(*results):
        # the weight gradient is a float32 dot product over ``width`` terms: its rounding grows with it
        torch.testing.assert_close(a, b, atol=1e-6 + 2e-7 * width, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_combine_in_bf16_accumulates_in_float32(backend):
    r, _, y = combine_case(50, 4, 2, 300, seed=4)
    ours = moe.unpermute(y.bfloat16(), moe.Routing(**{**r.__dict__, "backend": backend}))
    exact = moe.unpermute(y.bfloat16().float(), r)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, atol=1e-2, rtol=1e-2)


def expert_mlp_case(backend, tokens, experts, k, hidden, ffn, out, activation, bias, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = moe.route(separated_logits(tokens, experts, gen), torch.eye(experts), k, backend="torch")
    width = 2 * ffn if activation == "swiglu" else ffn
    tensors = [
        torch.randn(tokens * k, hidden, generator=gen),
        torch.randn(experts, width, hidden, generator=gen),
        torch.randn(experts, width, generator=gen),
        torch.randn(experts, out, ffn, generator=gen),
        torch.randn(experts, out, generator=gen),
    ]
    device = device_for(backend)
    x, w1, b1, w2, b2 = (t.to(device, dtype).requires_grad_() for t in tensors)
    if not bias:
        b1 = b2 = None
    y = moe.expert_mlp(x, r.offsets.to(device), w1, b1, w2, b2, activation, backend=backend)
    probe = torch.randn(y.shape, generator=gen).to(device, dtype)
    inputs = [t for t in (x, w1, b1, w2, b2) if t is not None]
    return [t.cpu() for t in [y, *torch.autograd.grad((y * probe).sum(), inputs)]]


@pytest.mark.gpu_check(5)
@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=15)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 7),
    k=st.integers(1, 3),
    hidden=st.integers(1, 40),
    ffn=st.integers(1, 40),
    out=st.integers(1, 40),
    activation=st.sampled_from(moe.ACTIVATIONS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_expert_mlp_matches_reference(backend, tokens, experts, k, hidden, ffn, out, activation, bias, seed):
    k = min(k, experts)
    args = (tokens, experts, k, hidden, ffn, out, activation, bias, seed)
    for a, b in zip(expert_mlp_case(backend, *args), expert_mlp_case("torch", *args)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
def test_expert_mlp_odd_sizes_and_empty_experts(backend):
    # 97 tokens over 7 experts, hidden 47: tiles straddle segment boundaries; expert 6 gets nothing
    args = (97, 7, 2, 47, 97, 31, "relu", True, 5)
    ours, ref = expert_mlp_case(backend, *args), expert_mlp_case("torch", *args)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (
        torch.randn(5, 8, generator=gen),
        torch.randn(3, 6, 8, generator=gen),
        torch.randn(3, 4, 6, generator=gen),
    )
    w1.requires_grad_()
    offsets = torch.tensor([0, 0, 5, 5])  # experts 0 and 2 have no rows
    y = moe.expert_mlp(x, offsets, w1, None, w2, None, "relu", backend=backend)
    torch.testing.assert_close(y, torch.relu(x @ w1[1].detach().t()) @ w2[1].t())
    (grad_w1,) = torch.autograd.grad(y.sum(), [w1])
    assert grad_w1[0].abs().sum() == 0 and grad_w1[2].abs().sum() == 0 and grad_w1[1].abs().sum() > 0


@pytest.mark.parametrize("backend", KERNELS)
def test_expert_mlp_bf16(backend):
    args = (30, 4, 2, 32, 48, 16, "silu", True, 6)
    ours = expert_mlp_case(backend, *args, dtype=torch.bfloat16)
    exact = expert_mlp_case("torch", *args, dtype=torch.float32)
    for a, b in zip(ours, exact):
        assert a.dtype == torch.bfloat16
        scale = b.abs().max().item() + 1
        torch.testing.assert_close(a.float(), b, atol=0.05 * scale, rtol=0.05)


def test_bad_route_arguments():
    x, gate = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="top_k"):
        moe.route(x, gate, 4)
    with pytest.raises(ValueError, match="top_k"):
        moe.route(x, gate, 0)
    with pytest.raises(TypeError, match="top_k"):
        moe.route(x, gate, 1.5)
    with pytest.raises(ValueError, match="gate_weight"):
        moe.route(x, torch.randn(3, 7), 1)
    with pytest.raises(TypeError, match="x"):
        moe.route(x.long(), gate, 1)
    with pytest.raises(ValueError, match="backend"):
        moe.route(x, gate, 1, backend="cuda")


def _experts(E=3, H=8, F=6, O=5):
    return torch.randn(E, F, H), torch.randn(E, F), torch.randn(E, O, F), torch.randn(E, O)


@pytest.mark.parametrize(
    "change,error,name",
    [
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(x=torch.randn(4, 7)), ValueError, "x"),
        (dict(x=torch.ones(4, 8, dtype=torch.long)), TypeError, "x"),
        (dict(w1=torch.randn(3, 6)), ValueError, "w1"),
        (dict(w2=torch.randn(2, 5, 6)), ValueError, "w2"),
        (dict(w2=torch.randn(3, 5, 7)), ValueError, "w2"),
        (dict(b1=torch.randn(3, 5)), ValueError, "b1"),
        (dict(b2=torch.randn(3, 4)), ValueError, "b2"),
        (dict(w1=torch.randn(3, 7, 8), b1=None, activation="swiglu"), ValueError, "w1"),
    ],
)
def test_bad_expert_arguments_are_named_before_any_work(change, error, name):
    w1, b1, w2, b2 = _experts()
    args = dict(x=torch.randn(4, 8), w1=w1, b1=b1, w2=w2, b2=b2, activation="relu")
    args.update(change)
    routing = moe.route(torch.randn(4, 8), torch.randn(3, 8), 2)
    with pytest.raises(error, match=name):
        moe.dense_experts(args["x"], routing.probs, args["w1"], args["b1"], args["w2"], args["b2"], args["activation"])
    with pytest.raises(error, match=name):
        moe.routed_experts(args["x"], routing, args["w1"], args["b1"], args["w2"], args["b2"], args["activation"])
    with pytest.raises(error, match=name):
        moe.expert_mlp(args["x"], routing.offsets, args["w1"], args["b1"], args["w2"], args["b2"], args["activation"])


def test_experts_refuse_a_routing_or_probs_of_another_shape():
    w1, b1, w2, b2 = _experts()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="routing"):
        moe.routed_experts(x, moe.route(torch.randn(5, 8), torch.randn(3, 8), 2), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="probs"):
        moe.dense_experts(x, torch.rand(4, 2), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="offsets"):
        moe.expert_mlp(x, torch.tensor([0, 4]), w1, b1, w2, b2)
