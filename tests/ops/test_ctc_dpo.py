"""CTC-DPO against the unfused OpenOmni-style recipe, dense and sparse paths, every backend."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifast
from omnifast.ops import ctc_dpo, reference_logps
from omnifast.training.references import ReferenceLogpCache

from ..devices import device_for, moved
from ..tolerances import TOL

BACKENDS = ("torch", "cpu", "triton")


def make_pairs(B, T, D, V, chosen_lengths, rejected_lengths, input_lengths, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype)
    chosen = torch.randint(0, V - 1, (B, max(max(chosen_lengths), 1)), generator=gen)
    rejected = torch.randint(0, V - 1, (B, max(max(rejected_lengths), 1)), generator=gen)
    refs = -torch.rand(2, B, generator=gen, dtype=torch.float64) * 10 - 5
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        chosen=chosen,
        rejected=rejected,
        input_lengths=torch.tensor(input_lengths),
        chosen_lengths=torch.tensor(chosen_lengths),
        rejected_lengths=torch.tensor(rejected_lengths),
        ref_chosen_logps=refs[0].to(dtype),
        ref_rejected_logps=refs[1].to(dtype),
    )


def unfused(
    p, beta=0.1, length_normalize=False, sft_weight=0.0, zero_infinity=False, hidden=None, weight=None, bias=None
):
    """Full logits, log_softmax and F.ctc_loss for each sequence (OpenOmni's recipe, refs cached)."""
    V = p["weight"].shape[0]
    logits = F.linear(hidden, weight, bias)  # bf16 logits from bf16 operands, as torch.autocast makes them
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).transpose(0, 1)
    nll_w = F.ctc_loss(log_probs, p["chosen"], p["input_lengths"], p["chosen_lengths"], blank=V - 1, reduction="none")
    nll_l = F.ctc_loss(
        log_probs, p["rejected"], p["input_lengths"], p["rejected_lengths"], blank=V - 1, reduction="none"
    )
    pw, pl = -nll_w, -nll_l
    if length_normalize:
        pw, pl = pw / p["chosen_lengths"].clamp(min=1), pl / p["rejected_lengths"].clamp(min=1)
    z = beta * ((pw - p["ref_chosen_logps"]) - (pl - p["ref_rejected_logps"]))
    per_pair = -F.logsigmoid(z)
    if sft_weight:
        per_pair = per_pair + sft_weight * nll_w / p["chosen_lengths"].clamp(min=1)
    if zero_infinity:
        per_pair = per_pair.masked_fill(torch.isinf(nll_w) | torch.isinf(nll_l), 0.0)
    return per_pair.mean(), z


def run(fn, p, **options):
    """``fn`` on the test device of its backend (tests/devices.py); outputs and gradients back on
    the CPU."""
    device = device_for(options.get("backend"))
    p = moved(p, device)
    leaves = {k: p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    out = fn(p, leaves, **options)
    loss = out[0] if isinstance(out, tuple) else out.loss
    grads = [g.cpu() for g in torch.autograd.grad(loss, list(leaves.values()))]
    if isinstance(out, tuple):
        return moved(tuple(t.detach() for t in out), "cpu"), grads
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return dataclasses.replace(out, **{k: None if v is None else v.detach().cpu() for k, v in fields.items()}), grads


def ours(p, leaves, **options):
    args = {k: v for k, v in p.items() if k not in leaves}
    return omnifast.ctc_dpo_loss(**leaves, **args, **options)


def theirs(p, leaves, **options):
    return unfused(p, **options, **leaves)


@st.composite
def pair_problems(draw, max_T=10, max_V=8):
    B, T, D, V = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, max_T)),
        draw(st.integers(1, 5)),
        draw(st.integers(2, max_V)),
    )
    input_lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    feasible = lambda n: st.integers(0, max(0, n // 2))  # noqa: E731  (2L <= T is always feasible)
    chosen = [draw(feasible(n)) for n in input_lengths]
    rejected = [draw(feasible(n)) for n in input_lengths]
    return make_pairs(B, T, D, V, chosen, rejected, input_lengths, seed=draw(st.integers(0, 2**20)))


OPTIONS = [dict(), dict(length_normalize=True), dict(sft_weight=0.5), dict(length_normalize=True, sft_weight=0.2)]


def check(p, backend, dtype=torch.float64, **options):
    sparse_ok = not options.get("length_normalize") and not options.get("sft_weight")
    (expected_loss, expected_z), expected_grads = run(theirs, p, **options)
    for sparse in (True, False) if sparse_ok else (False,):
        out, grads = run(ours, p, backend=backend, sparse=sparse, exact_rewards=True, **options)
        torch.testing.assert_close(out.loss, expected_loss, **TOL[dtype])
        torch.testing.assert_close(out.reward_margins, expected_z, **TOL[dtype])
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "normalised", "sft", "normalised+sft"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@settings(max_examples=15)
@given(p=pair_problems())
def test_matches_unfused_recipe(p, backend, options):
    check(p, backend, **options)


@pytest.mark.gpu_check(4)
@settings(max_examples=5)
@given(p=pair_problems(max_T=6, max_V=6))
def test_triton_matches_unfused_recipe(p):
    for options in OPTIONS[:2]:
        check(p, "triton", **options)


@pytest.mark.gpu_check(4)
@pytest.mark.parametrize("group_elements", [1 << 22, 2 * 14 * 12, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_dense_paths_agree(backend, group_elements, monkeypatch):
    # T x K = 14 x 12 logits a pair: one group of 3 pairs, groups of 2 and 1, one pair per group
    monkeypatch.setattr(ctc_dpo, "SPARSE_GROUP_ELEMENTS", group_elements)
    p = make_pairs(3, 14, 6, 40, [4, 6, 0], [5, 2, 3], [14, 12, 9], seed=2, dtype=torch.float32)
    dense, dense_grads = run(ours, p, backend=backend, sparse=False)
    sparse, sparse_grads = run(ours, p, backend=backend, sparse=True, exact_rewards=True)
    for name in (
        "loss",
        "reward_margins",
        "reward_accuracy",
        "chosen_rewards",
        "rejected_rewards",
        "policy_chosen_logps",
        "policy_rejected_logps",
    ):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), **TOL[torch.float32])
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, **TOL[torch.float32])
    lean, _ = run(ours, p, backend=backend)  # sparse by default, rewards left out
    assert lean.chosen_rewards is None and lean.policy_chosen_logps is None
    torch.testing.assert_close(lean.loss, dense.loss, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_identical_pair_has_zero_margin_and_loss_log2(backend, sparse):
    p = make_pairs(2, 8, 4, 6, [3, 2], [3, 2], [8, 7], seed=3)
    p["rejected"], p["ref_rejected_logps"] = p["chosen"].clone(), p["ref_chosen_logps"].clone()
    out, grads = run(ours, p, backend=backend, sparse=sparse)
    assert torch.allclose(out.reward_margins, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-12)
    assert out.reward_accuracy.item() == 0.0
    assert all(g.abs().max() < 1e-12 for g in grads)  # the pair pulls both ways equally


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_identical_pair_is_trained_by_the_sft_term_alone(backend):
    """A pair whose rejected units are its chosen ones (an anchor: a prompt whose speech should stay
    as it is) contributes log 2 to the loss and only the chosen NLL's gradient."""
    p = make_pairs(2, 8, 4, 6, [3, 2], [3, 2], [8, 7], seed=5)
    p["rejected"], p["ref_rejected_logps"] = p["chosen"].clone(), p["ref_chosen_logps"].clone()
    out, grads = run(ours, p, backend=backend, sft_weight=0.5)

    def sft_only(p, leaves):
        logits = F.linear(leaves["hidden"], leaves["weight"], leaves["bias"])
        log_probs = logits.log_softmax(-1).transpose(0, 1)
        nll = F.ctc_loss(log_probs, p["chosen"], p["input_lengths"], p["chosen_lengths"], blank=5, reduction="none")
        return ((0.5 * nll / p["chosen_lengths"]).mean(),)

    (expected_loss,), expected_grads = run(sft_only, p)
    torch.testing.assert_close(out.loss, expected_loss + math.log(2), **TOL[torch.float64])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [True, False])
def test_infeasible_pairs(backend, sparse):
    p = make_pairs(3, 6, 4, 7, [2, 5, 1], [1, 1, 2], [6, 3, 6], seed=4)  # pair 1: 5 units in 3 frames
    out, grads = run(ours, p, backend=backend, sparse=sparse, zero_infinity=True)
    # Expected: the recipe on the feasible pairs alone, rescaled to the mean over all three.
    # (Masking torch's inf loss would leave NaN gradients behind: that is what zero_infinity fixes.)
    keep = torch.tensor([0, 2])
    feasible = {k: v[keep] if k not in ("weight", "bias") else v for k, v in p.items()}
    expected, expected_grads = run(
        lambda q, leaves: tuple(x * 2 / 3 if i == 0 else x for i, x in enumerate(theirs(q, leaves))), feasible
    )
    torch.testing.assert_close(out.loss, expected[0])
    assert (grads[0][1] == 0).all()
    torch.testing.assert_close(grads[0][keep], expected_grads[0])
    for g, e in zip(grads[1:], expected_grads[1:]):
        torch.testing.assert_close(g, e)
    out, grads = run(ours, p, backend=backend, sparse=sparse, zero_infinity=False)
    assert math.isinf(out.loss.item()) and torch.isfinite(grads[0][0]).all()
    assert torch.isnan(grads[0][1, :3]).all() and (grads[0][1, 3:] == 0).all()  # frames past the input: 0


@pytest.mark.gpu_check(4)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    p = make_pairs(2, 10, 8, 12, [3, 4], [4, 2], [10, 9], seed=5, dtype=torch.bfloat16)
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()}
    (truth, _), truth_grads = run(theirs, exact)
    (reference, _), reference_grads = run(theirs, p)  # the torch recipe on the same bf16 tensors
    for sparse in (True, False):
        out, grads = run(ours, p, backend=backend, sparse=sparse)
        assert out.loss.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
        assert abs(out.loss.item() - truth.item()) <= 2 * abs(reference.item() - truth.item()) + 1e-4
        for g, r, t in zip(grads, reference_grads, truth_grads):
            assert (g.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-3 * t.abs().max()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "options", [dict(sparse=True), dict(sparse=False), dict(length_normalize=True, sft_weight=0.3)]
)
def test_gradcheck(backend, options):
    p = make_pairs(2, 5, 3, 5, [2, 1], [1, 2], [5, 4], seed=6)
    args = {k: v for k, v in p.items() if k not in ("hidden", "weight", "bias")}
    leaves = tuple(p[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(
        lambda h, w, b: omnifast.ctc_dpo_loss(h, w, b, **args, beta=0.7, backend=backend, **options).loss, leaves
    )


def test_reference_cache_round_trip(tmp_path):
    p = make_pairs(3, 9, 5, 8, [3, 2, 4], [2, 4, 1], [9, 8, 9], seed=7)
    path = tmp_path / "ref.safetensors"
    batch = dict(
        ids=["a", "b", "c"],
        hidden=p["hidden"],
        chosen=p["chosen"],
        rejected=p["rejected"],
        input_lengths=p["input_lengths"],
        chosen_lengths=p["chosen_lengths"],
        rejected_lengths=p["rejected_lengths"],
    )
    cache = ReferenceLogpCache.build(path, [batch], p["weight"], p["bias"], length_normalize=True)
    assert len(cache) == 3 and path.exists()
    w, l = reference_logps(
        p["hidden"],
        p["weight"],
        p["bias"],
        p["chosen"],
        p["rejected"],
        p["input_lengths"],
        p["chosen_lengths"],
        p["rejected_lengths"],
        length_normalize=True,
    )
    log_probs = F.linear(p["hidden"], p["weight"], p["bias"]).log_softmax(-1).transpose(0, 1)
    expected = (
        -F.ctc_loss(log_probs, p["chosen"], p["input_lengths"], p["chosen_lengths"], blank=7, reduction="none")
        / p["chosen_lengths"]
    )
    torch.testing.assert_close(w, expected)
    reloaded = ReferenceLogpCache(path)
    assert len(reloaded) == 3 and "b" in reloaded and not list(tmp_path.glob("*.tmp"))
    got_w, got_l = reloaded.lookup(["c", "a"], dtype=torch.float64)
    torch.testing.assert_close(got_w, w[[2, 0]])
    torch.testing.assert_close(got_l, l[[2, 0]])
    with pytest.raises(KeyError, match="zzz"):
        reloaded.lookup(["zzz"])


def test_module_form():
    p = make_pairs(2, 8, 6, 9, [3, 2], [2, 3], [8, 8], seed=8, dtype=torch.float32)
    head = omnifast.nn.LinearCTCHead(6, 8)
    with torch.no_grad():
        head.weight.copy_(p["weight"])
        head.bias.copy_(p["bias"])
    loss_fn = omnifast.nn.CTCDPOLoss(beta=0.1)
    refs = loss_fn.reference(
        head, p["hidden"], p["chosen"], p["rejected"], p["input_lengths"], p["chosen_lengths"], p["rejected_lengths"]
    )
    out = loss_fn(
        head,
        p["hidden"],
        p["chosen"],
        p["rejected"],
        p["input_lengths"],
        p["chosen_lengths"],
        p["rejected_lengths"],
        *refs,
    )
    assert abs(out.loss.item() - math.log(2)) < 1e-6  # policy == reference: zero margin
    out.loss.backward()
    assert head.weight.grad is not None


BAD = [
    (ValueError, "rejected", dict(rejected=torch.tensor([[1, 2]]))),
    (ValueError, "chosen", dict(chosen=torch.tensor([[1, 2], [1, 2], [3, 3]]))),
    (ValueError, "ref_chosen_logps", dict(ref_chosen_logps=torch.zeros(3))),
    (ValueError, "ref_rejected_logps", dict(ref_rejected_logps=torch.tensor([0.0, float("-inf")]))),
    (TypeError, "ref_chosen_logps", dict(ref_chosen_logps=torch.zeros(2, dtype=torch.long))),
    (ValueError, "beta", dict(beta=0.0)),
    (ValueError, "beta", dict(beta=-1)),
    (ValueError, "sft_weight", dict(sft_weight=-0.1)),
    (ValueError, "sparse", dict(sparse=True, length_normalize=True)),
    (ValueError, "weight", dict(weight=torch.randn(6, 5))),
    (ValueError, "bias", dict(bias=torch.randn(4))),
    (ValueError, "chosen_lengths", dict(chosen_lengths=torch.tensor([3, 1]))),
    (ValueError, "rejected", dict(rejected=torch.tensor([[6, 2], [1, 1]]))),
]


@pytest.mark.parametrize("error,name,changes", BAD, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(error, name, changes):
    kwargs = dict(
        hidden=torch.randn(2, 4, 3),
        weight=torch.randn(6, 3),
        bias=torch.randn(6),
        chosen=torch.tensor([[1, 2], [1, 1]]),
        rejected=torch.tensor([[2, 2], [0, 1]]),
        input_lengths=torch.tensor([4, 4]),
        chosen_lengths=torch.tensor([2, 1]),
        rejected_lengths=torch.tensor([1, 2]),
        ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2),
    )
    kwargs.update(changes)
    with pytest.raises(error, match=name):
        omnifast.ctc_dpo_loss(**kwargs)
