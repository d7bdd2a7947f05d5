"""MoE against NaiveMoE, the router's invariants and aux losses, loading and bad input."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifast.nn import MoE, NaiveMoE
from omnifast.openomni import load_moe_state_dict
from omnifast.ops import moe as moe_ops

from ..devices import device_for
from ..tolerances import TOL


def outputs_and_grads(module, x):
    """Output, aux losses and every gradient, computed where the module's backend runs (the test
    device, tests/devices.py), returned on the CPU."""
    device = device_for(getattr(module, "backend", None))
    module = module.to(device)
    x = x.detach().clone().to(device).requires_grad_()
    out = module(x)
    probe = torch.linspace(-1, 1, out.output.numel(), dtype=out.output.dtype, device=device).view_as(out.output)
    loss = (out.output * probe).sum() + out.balance_loss + out.z_loss
    grads = torch.autograd.grad(loss, [x] + [p for p in module.parameters()])
    return [t.cpu() for t in [out.output.detach(), out.balance_loss.detach(), out.z_loss.detach()] + list(grads)]


def check_against_naive(x, dtype=torch.float64, backend=None, **config):
    torch.manual_seed(0)
    naive = NaiveMoE(**config).to(dtype)
    moe = MoE.from_naive(naive, backend=backend)
    ours, reference = outputs_and_grads(moe, x.to(dtype)), outputs_and_grads(naive, x.to(dtype))
    for i, (a, b) in enumerate(zip(ours, reference)):
        # The router runs in float32, so the aux losses (items 1, 2) and the gradients of x
        # (item 3) and of the gate weight (the last parameter) carry float32 rounding even for
        # float64 inputs. The kernels' float32 softmax rounds differently from torch's in the
        # last bit, and every output is scaled by those float32 weights.
        router_bound = i in (1, 2, 3, len(ours) - 1) or moe.backend not in (None, "torch")
        torch.testing.assert_close(a, b, **TOL[torch.float32 if router_bound else dtype])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=30)
@given(
    tokens=st.integers(1, 40),
    hidden=st.integers(1, 9),
    ffn=st.integers(1, 9),
    out=st.integers(1, 9),
    experts=st.integers(1, 7),
    k=st.integers(0, 7),
    activation=st.sampled_from(moe_ops.ACTIVATIONS),
    bias=st.booleans(),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_naive(backend, tokens, hidden, ffn, out, experts, k, activation, bias, normalize, seed):
    top_k = None if k == 0 else min(k, experts)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    check_against_naive(
        x,
        backend=backend,
        hidden=hidden,
        ffn=ffn,
        out=out,
        experts=experts,
        top_k=top_k,
        activation=activation,
        bias=bias,
        normalize_topk=normalize,
    )


@pytest.mark.gpu_check(5)
@settings(max_examples=10)
@given(
    tokens=st.integers(1, 30),
    hidden=st.integers(1, 20),
    ffn=st.integers(1, 20),
    experts=st.integers(1, 7),
    k=st.integers(0, 7),
    activation=st.sampled_from(moe_ops.ACTIVATIONS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_naive(tokens, hidden, ffn, experts, k, activation, bias, seed):
    # float32: Triton's tl.dot has no float64 path on the GPU, so its kernels are tested in float32
    top_k = None if k == 0 else min(k, experts)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
    check_against_naive(
        x,
        dtype=torch.float32,
        backend="triton",
        hidden=hidden,
        ffn=ffn,
        out=hidden,
        experts=experts,
        top_k=top_k,
        activation=activation,
        bias=bias,
    )


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("tokens", [1, 3, 97])
@pytest.mark.parametrize("top_k", [None, 1, 2, 7])
def test_odd_sizes(backend, tokens, top_k):
    x = torch.randn(tokens, 47, dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    check_against_naive(x, dtype=dtype, backend=backend, hidden=47, ffn=97, out=31, experts=7, top_k=top_k)


def test_float32_and_batched_input():
    x = torch.randn(3, 11, 16)
    check_against_naive(x, dtype=torch.float32, hidden=16, ffn=24, out=8, experts=4, top_k=2)


def test_bf16_close_to_float32():
    torch.manual_seed(1)
    naive = NaiveMoE(16, 32, 16, experts=4, top_k=2)
    x = torch.randn(64, 16)
    exact = naive(x).output
    moe = MoE.from_naive(naive).to(torch.bfloat16)
    reference = naive.to(torch.bfloat16)(x.bfloat16()).output.float()
    ours = moe(x.bfloat16()).output.float()
    assert (ours - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-2


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_all_tokens_to_one_expert_and_experts_without_tokens(backend):
    torch.manual_seed(2)
    naive = NaiveMoE(8, 12, 8, experts=5, top_k=1).double()
    with torch.no_grad():
        naive.gate.weight.zero_()
        naive.gate.weight[3] = 5.0  # positive inputs all pick expert 3
    x = torch.rand(20, 8, dtype=torch.float64) + 0.1
    routing = moe_ops.route(x, naive.gate.weight, 1, backend=backend)
    assert routing.counts.tolist() == [0, 0, 0, 20, 0]
    moe = MoE.from_naive(naive, backend=backend)
    for a, b in zip(outputs_and_grads(moe, x), outputs_and_grads(naive, x)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@given(tokens=st.integers(1, 50), experts=st.integers(1, 8), k=st.integers(1, 8), seed=st.integers(0, 999))
def test_routing_invariants(tokens, experts, k, seed):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    x, gate = torch.randn(tokens, 6, generator=gen), torch.randn(experts, 6, generator=gen)
    r = moe_ops.route(x, gate, k)
    assert int(r.counts.sum()) == tokens * k and r.offsets[-1] == tokens * k
    assert torch.equal(r.order[r.position], torch.arange(tokens * k))  # inverse permutation
    assert torch.equal(r.experts.reshape(-1)[r.order], torch.sort(r.experts.reshape(-1)).values)
    assert torch.allclose(r.weights.sum(-1), torch.ones(tokens))  # renormalised
    assert (r.experts[:, :-1] != r.experts[:, 1:]).all() if k > 1 else True


def test_ties_break_to_the_lower_expert():
    r = moe_ops.route(torch.ones(4, 3), torch.zeros(5, 3), 2)  # all logits equal
    assert r.experts.tolist() == [[0, 1]] * 4


def test_aux_losses_at_uniform_routing_and_full_collapse():
    E, weight = 4, 0.01
    moe = MoE(8, 8, experts=E, top_k=1, balance_weight=weight)
    x = torch.randn(8, 8)
    with torch.no_grad():
        moe.gate.weight.zero_()
    uniform_probs = moe(x)  # ties: every token to expert 0, but P_i = 1/E: balance = E * (1 * 1/E) = 1
    assert torch.isclose(uniform_probs.balance_loss, torch.tensor(1.0))
    dense = MoE(8, 8, experts=E, top_k=E, balance_weight=weight)
    with torch.no_grad():
        dense.gate.weight.zero_()
    out = dense(x)  # uniform: f_i = P_i = 1/E
    assert torch.isclose(out.aux_loss, torch.tensor(weight))
    with torch.no_grad():
        moe.gate.weight[2] = 100.0
    collapsed = moe(torch.rand(8, 8) + 0.5)  # everything to expert 2 with probability ~1
    assert torch.isclose(collapsed.aux_loss, torch.tensor(E * weight), rtol=1e-4)
    assert collapsed.z_loss > 0 and collapsed.z_loss.dtype == torch.float32


def test_one_expert_is_a_dense_mlp():
    moe = MoE(6, 10, 4, experts=1, top_k=1).double()
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4)).double()
    mlp.load_state_dict({"0.weight": moe.w1[0], "0.bias": moe.b1[0], "2.weight": moe.w2[0], "2.bias": moe.b2[0]})
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(moe(x).output, mlp(x))


class OpenOmniMoE(torch.nn.Module):
    """OpenOmni's MoE as its code defines it: ``gate.fc`` (with a bias), ``experts.{e}.fc1`` /
    ``fc2``, every expert's output weighted by the softmax gate, then split into 4 interleaved
    tokens (``rearrange('b n (d1 d2) -> b (n d2) d1', d2=4)``)."""

    def __init__(self, hidden, out, experts):
        super().__init__()
        self.gate = torch.nn.Module()
        self.gate.fc = torch.nn.Linear(hidden, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Module() for _ in range(experts))
        for expert in self.experts:
            expert.fc1, expert.fc2 = torch.nn.Linear(hidden, out), torch.nn.Linear(out, out)

    def forward(self, x):
        scores = torch.softmax(self.gate.fc(x), -1)
        outs = torch.stack([e.fc2(torch.relu(e.fc1(x))) for e in self.experts], -2)
        y = (scores[..., None] * outs).sum(-2)
        B, N, O = y.shape
        return y.view(B, N, O // 4, 4).transpose(2, 3).reshape(B, N * 4, O // 4)


def test_openomni_moe_loads_by_its_real_keys_and_interleaves_its_split():
    torch.manual_seed(0)
    theirs = OpenOmniMoE(8, 16, 4).double()
    moe = MoE(8, 16, 16, experts=4, top_k=None, split_tokens=4, gate_bias=True).double()
    load_moe_state_dict(moe, {f"input_proj.{k}": v for k, v in theirs.state_dict().items()}, prefix="input_proj.")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x).output, theirs(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gate_bias=True"):
        load_moe_state_dict(MoE(8, 16, 16, experts=4, top_k=None, split_tokens=4), theirs.state_dict())
    old_layout = {"gate.weight": torch.zeros(4, 8), **{f"experts.{e}.0.weight": torch.zeros(16, 8) for e in range(4)}}
    with pytest.raises(KeyError, match="gate.fc.weight, gate.fc.bias, experts.0.fc1.weight"):
        load_moe_state_dict(moe, old_layout)


def test_state_dict_round_trip_is_exact():
    naive = NaiveMoE(8, 12, experts=3, top_k=2, activation="swiglu")
    moe = MoE(8, 12, experts=3, top_k=2, activation="swiglu")
    moe.load_state_dict(naive.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), naive.state_dict().values()))
    assert list(moe.state_dict()) == list(naive.state_dict())


def test_jitter_only_in_training():
    moe = MoE(8, 8, experts=4, top_k=1, jitter=0.5)
    x = torch.randn(32, 8)
    moe.eval()
    assert torch.equal(moe(x).output, moe(x).output)


BAD = [
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(activation="tanh"), "activation"),
    (dict(experts=0), "experts"),
    (dict(split_tokens=3), "split_tokens"),
    (dict(jitter=-1.0), "jitter"),
]


@pytest.mark.parametrize("config,name", BAD)
def test_bad_config(config, name):
    with pytest.raises(ValueError, match=name):
        MoE(8, 16, **{"experts": 4, **config})


def test_bad_input():
    moe = MoE(8, 16, experts=4, top_k=2)
    with pytest.raises(ValueError, match="hidden size"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"w1 has shape \(4, 16, 9\).*expects \(4, 16, 8\)"):
        moe.load_state_dict({"gate.weight": torch.zeros(4, 8), "w1": torch.zeros(4, 16, 9)}, strict=False)
    with pytest.raises(ValueError, match=r"experts=3.*expects \(3, "):
        MoE(8, 16, experts=3).load_state_dict(moe.state_dict())
    with pytest.raises(ValueError, match="backend"):
        MoE(8, 16, backend="gpu")


@pytest.mark.gpu_check(5)
@pytest.mark.parametrize(
    "engine,dtype",
    [
        ("triton", torch.float32),
        ("grouped_mm", torch.float32),
        ("grouped_mm", torch.bfloat16),
        ("segments", torch.float32),
        ("segments", torch.float64),
    ],
)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_gemm_engine_of_the_triton_backend_matches_naive(engine, dtype, activation, bias):
    """The GPU's three GEMM engines (torch._grouped_mm through its CPU implementation here), one
    autograd algebra: top-2 with an expert that gets no token, forward and every gradient."""
    torch.manual_seed(5)
    naive = NaiveMoE(16, 24, 8, experts=5, top_k=2, activation=activation, bias=bias, gate_bias=True).to(dtype)
    with torch.no_grad():
        naive.gate.weight[4], naive.gate.bias[4] = 0.0, -50.0  # expert 4 loses every vote
    x = torch.randn(37, 16, dtype=dtype)
    moe = MoE.from_naive(naive, backend="triton", gemm_engine=engine)
    ours, reference = outputs_and_grads(moe, x), outputs_and_grads(naive, x)
    assert moe(x.to(device_for("triton"))).routing.counts[4] == 0
    for a, b in zip(ours, reference):
        if dtype == torch.bfloat16:
            scale = b.float().abs().max() + 1e-3
            assert (a.float() - b.float()).abs().max() <= 0.05 * scale
        else:
            torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tile_configurations_run_under_the_interpreter(monkeypatch, arch, dtype):
    """The tiles, warps and stages chosen for sm_80 / sm_90 give the right result (and, recorded,
    are what the AOT test compiles for those architectures)."""
    monkeypatch.setenv("OMNIFAST_TRITON_ARCH", str(arch))
    torch.manual_seed(6)
    naive = NaiveMoE(32, 48, 32, experts=4, top_k=2).double()
    x = torch.randn(150, 32, dtype=torch.float64)
    ours = outputs_and_grads(MoE.from_naive(naive, backend="triton", gemm_engine="triton").to(dtype), x.to(dtype))
    exact = outputs_and_grads(naive, x)
    if dtype == torch.float32:
        for a, b in zip(ours, exact):
            torch.testing.assert_close(a.double(), b.double(), **TOL[torch.float32])
        return
    # bf16: within 4x the naive layer's own bf16 error (2x, doubled for the interpreter's
    # truncating bf16 conversion, see tests/ops/test_mixed_precision.py)
    reference = outputs_and_grads(copy.deepcopy(naive).to(dtype), x.to(dtype))
    for a, r, b in zip(ours, reference, exact):
        assert (a.double() - b).abs().max() <= 4 * (r.double() - b).abs().max() + 1e-3 * b.abs().max()
