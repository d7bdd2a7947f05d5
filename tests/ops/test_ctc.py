"""CTC: the reference against F.ctc_loss, and every backend against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import omnifast

from ..devices import device_for
from ..tolerances import TOL, assert_close, value_and_grads
from .ctc_cases import Problem, make_problem, problems

REDUCTIONS = ("none", "mean", "sum")
KERNEL_BACKENDS = ("cpu", "triton")


def loss_and_grad(fn, x: torch.Tensor, p: Problem, reduction="sum", zero_infinity=False, targets=None, **kw):
    """Loss and gradient on the backend's test device (see tests/devices.py), returned on the CPU."""
    targets = p.targets if targets is None else targets
    return value_and_grads(
        fn,
        [x],
        targets,
        p.input_lengths,
        p.target_lengths,
        device=device_for(kw.get("backend")),
        blank=p.blank,
        reduction=reduction,
        zero_infinity=zero_infinity,
        **kw,
    )


def torch_loss_and_grad(p: Problem, reduction="sum", zero_infinity=False):
    """F.ctc_loss through log_softmax: the logits gradient is the one torch is right about."""

    def fn(x, *args, **kw):
        return F.ctc_loss(x.log_softmax(-1), *args, **kw)

    return loss_and_grad(fn, p.logits, p, reduction, zero_infinity)


def ours(p: Problem, backend: str, from_logits: bool, reduction="sum", zero_infinity=False, targets=None):
    """omnifast's loss and logits gradient, from logits or through a torch log_softmax."""
    if from_logits:
        return loss_and_grad(
            omnifast.ctc_loss_with_logits, p.logits, p, reduction, zero_infinity, targets=targets, backend=backend
        )

    def fn(x, *args, **kw):
        return omnifast.ctc_loss(x.log_softmax(-1), *args, **kw)

    return loss_and_grad(fn, p.logits, p, reduction, zero_infinity, targets=targets, backend=backend)


# --- the reference against torch --------------------------------------------------------------


@given(problems())
def test_reference_matches_torch(p):
    for reduction in REDUCTIONS:
        for zero_infinity in (False, True):
            expected = torch_loss_and_grad(p, reduction, zero_infinity)
            for from_logits in (False, True):
                actual = ours(p, "torch", from_logits, reduction, zero_infinity)
                assert_close(actual[0], expected[0])
                assert_close(actual[1], expected[1])


# --- the kernels against the reference --------------------------------------------------------


def assert_as_accurate(actual, reference, truth):
    """float32 results held to the float64 truth, at float32's tolerances widened by twice the
    float32 reference's own largest error (peaked distributions over many frames put even the
    reference ~1e-5 off, and a kernel that adds in another order lands elsewhere in that band)."""
    reference_error = (reference.double() - truth).nan_to_num(0.0, 0.0, 0.0).abs().max()
    tol = TOL[torch.float32]
    torch.testing.assert_close(
        actual.double(), truth, equal_nan=True, rtol=tol["rtol"], atol=tol["atol"] + 2 * float(reference_error)
    )


def check_against_reference(p: Problem, backend: str, dtype: torch.dtype, from_logits: bool):
    p = p.with_dtype(dtype)
    for reduction in REDUCTIONS:
        for zero_infinity in (False, True):
            expected = ours(p, "torch", from_logits, reduction, zero_infinity)
            actual = ours(p, backend, from_logits, reduction, zero_infinity)
            if dtype == torch.float64:
                assert_close(actual[0], expected[0], dtype)
                assert_close(actual[1], expected[1], dtype)
                continue
            truth = ours(p.with_dtype(torch.float64), "torch", from_logits, reduction, zero_infinity)
            for a, e, t in zip(actual, expected, truth):
                assert_as_accurate(a, e, t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("from_logits", [False, True])
@given(p=problems())
def test_cpu_matches_reference(p, dtype, from_logits):
    check_against_reference(p, "cpu", dtype, from_logits)


@pytest.mark.gpu_check(2)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("from_logits", [False, True])
@settings(max_examples=6)
@given(p=problems(max_T=8, max_B=3, max_C=6, max_L=4))
def test_triton_matches_reference(p, dtype, from_logits):
    check_against_reference(p, "triton", dtype, from_logits)


@settings(max_examples=15)
@given(p=problems(max_T=80, max_B=3, max_C=64, max_L=30))
def test_reference_and_cpu_on_longer_sequences_and_larger_vocabularies(p):
    """The same checks past the interpreter's small shapes: the reference against torch, and the
    C++ kernel against the reference, in float64."""
    expected = torch_loss_and_grad(p, "mean", True)
    actual = ours(p, "torch", True, "mean", True)
    assert_close(actual[0], expected[0], name="reference loss")
    assert_close(actual[1], expected[1], name="reference grad")
    check_against_reference(p, "cpu", torch.float64, from_logits=True)


def test_cpu_matches_reference_at_speech_scale():
    """Long sequences and a large vocabulary, as in the speech decoder. Over hundreds of frames
    float32 itself is off by ~1e-4 (F.ctc_loss too), so both are held to the float64 truth:
    the kernel's error at most twice the float32 reference's."""
    p = make_problem(
        T=300,
        B=3,
        C=700,
        blank=699,
        target_lengths=[120, 0, 80],
        input_lengths=[300, 250, 161],
        seed=3,
        dtype=torch.float32,
    )
    exact = ours(p.with_dtype(torch.float64), "torch", True, "mean")
    for from_logits in (False, True):
        reference = ours(p, "torch", from_logits, "mean")
        actual = ours(p, "cpu", from_logits, "mean")
        for ours_value, reference_value, truth in zip(actual, reference, exact):
            reference_error = (reference_value.double() - truth).abs().max()
            assert (ours_value.double() - truth).abs().max() <= 2 * reference_error + 1e-6


def test_triton_tiles_states_longer_than_one_row_tile(monkeypatch):
    """2L+1 above the row kernels' state tile loops over tiles (as 2L+1 > 1024 does on a GPU);
    the recursion keeps all states in one register tile."""
    from omnifast.kernels import ctc as triton_ctc

    monkeypatch.setattr(triton_ctc, "ROW_STATES", 16)  # 41 states: three tiles
    p = make_problem(T=30, B=2, C=5, blank=4, target_lengths=[20, 13], input_lengths=[30, 27], seed=5)
    for from_logits in (False, True):
        expected = ours(p, "torch", from_logits, "sum")
        actual = ours(p, "triton", from_logits, "sum")
        assert_close(actual[0], expected[0])
        assert_close(actual[1], expected[1])


# --- edge cases, every backend ----------------------------------------------------------------

EDGE_CASES = {
    "empty_targets": dict(T=5, B=2, C=4, blank=0, target_lengths=[0, 0]),
    "T_is_1": dict(T=1, B=3, C=4, blank=0, target_lengths=[0, 1, 2]),
    "all_repeated_labels": dict(T=12, B=2, C=5, blank=2, target_lengths=[5, 3], repeated=True),
    "infeasible": dict(T=4, B=3, C=5, blank=0, target_lengths=[4, 3, 1], repeated=True),
    "short_input_lengths": dict(T=10, B=3, C=6, blank=3, target_lengths=[2, 3, 0], input_lengths=[4, 10, 0]),
    "blank_first": dict(T=9, B=2, C=6, blank=0, target_lengths=[3, 4]),
    "blank_last": dict(T=9, B=2, C=6, blank=5, target_lengths=[3, 4]),
    "peaked_distributions": dict(T=9, B=2, C=6, blank=5, target_lengths=[3, 4], scale=60.0),
}


@pytest.mark.gpu_check(2)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(case, from_logits, backend):
    p = make_problem(**EDGE_CASES[case])
    for dtype in (torch.float64, torch.float32):
        check_against_reference(p, backend, dtype, from_logits)


def test_infeasible_targets_like_torch():
    p = make_problem(**EDGE_CASES["infeasible"])
    loss, grad = ours(p, "cpu", True, "none", zero_infinity=False)
    torch_loss, torch_grad = torch_loss_and_grad(p, "none", zero_infinity=False)
    assert torch.isinf(loss[:2]).all() and torch.isfinite(loss[2])
    assert_close(loss, torch_loss)
    assert_close(grad, torch_grad)  # NaN for the infeasible sequences, as torch
    loss, grad = ours(p, "cpu", True, "none", zero_infinity=True)
    assert (loss[:2] == 0).all() and (grad[:, :2] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.gpu_check(2)
@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
@pytest.mark.parametrize("from_logits", [False, True])
def test_concatenated_and_unbatched_targets(backend, from_logits):
    p = make_problem(T=10, B=3, C=6, blank=5, target_lengths=[2, 4, 3], input_lengths=[10, 9, 6])
    padded = ours(p, backend, from_logits, "none")
    concatenated = ours(p, backend, from_logits, "none", targets=p.concatenated_targets())
    assert_close(concatenated[0], padded[0])
    assert_close(concatenated[1], padded[1])
    fn = omnifast.ctc_loss_with_logits if from_logits else omnifast.ctc_loss
    device = device_for(backend)
    for b in range(3):
        x = p.logits[:, b] if from_logits else p.logits[:, b].log_softmax(-1)
        n = int(p.target_lengths[b])
        loss = fn(
            x[: int(p.input_lengths[b])].to(device),
            p.targets[b, :n].to(device),
            int(p.input_lengths[b]),
            n,
            blank=p.blank,
            reduction="none",
            backend=backend,
        )
        assert loss.shape == ()
        assert_close(loss.cpu(), padded[0][b])


@pytest.mark.gpu_check(2)
@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
@pytest.mark.parametrize("from_logits", [False, True])
def test_bf16_within_twice_the_reference_error(backend, from_logits):
    p = make_problem(T=16, B=3, C=10, blank=9, target_lengths=[5, 2, 6], seed=7, dtype=torch.bfloat16)
    exact = ours(p.with_dtype(torch.float32), "torch", from_logits, "mean")
    reference = ours(p, "torch", from_logits, "mean")
    actual = ours(p, backend, from_logits, "mean")
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.bfloat16
    for ours_value, reference_value, truth in zip(actual, reference, exact):
        reference_error = (reference_value.float() - truth).abs().max()
        assert (ours_value.float() - truth).abs().max() <= 2 * reference_error + 1e-5


def test_float16_input():
    p = make_problem(T=12, B=2, C=8, blank=0, target_lengths=[3, 4], dtype=torch.float16)
    loss = ours(p, "cpu", True, "mean")[0]
    assert_close(loss, ours(p.with_dtype(torch.float32), "torch", True, "mean")[0], torch.float32)


@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_nan_input_propagates(backend):
    p = make_problem(T=6, B=2, C=5, blank=0, target_lengths=[2, 2])
    p.logits[2, 0, :] = float("nan")
    loss, grad = ours(p, backend, True, "none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(grad[:, 0]).any() and torch.isfinite(grad[:, 1]).all()


# --- exact gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, from_logits, reduction):
    p = make_problem(T=7, B=3, C=5, blank=4, target_lengths=[2, 3, 0], input_lengths=[7, 6, 3], seed=11)
    fn = omnifast.ctc_loss_with_logits if from_logits else omnifast.ctc_loss
    x = p.logits.clone().requires_grad_()  # raw values, not log-probs: the derivative is exact anyway
    assert torch.autograd.gradcheck(
        lambda z: fn(
            z, p.targets, p.input_lengths, p.target_lengths, blank=p.blank, reduction=reduction, backend=backend
        ),
        (x,),
    )


def test_torch_gradient_is_not_exact_but_ours_is():
    """Why we compare with torch only through log_softmax (pytorch#52241)."""
    p = make_problem(T=5, B=1, C=4, blank=0, target_lengths=[2])
    lp = p.logits.log_softmax(-1)
    ours_grad = loss_and_grad(omnifast.ctc_loss, lp, p, backend="cpu")[1]
    torch_grad = loss_and_grad(F.ctc_loss, lp, p)[1]
    assert not torch.allclose(ours_grad, torch_grad)
    assert torch.allclose(torch_grad - lp.exp(), ours_grad, atol=1e-12)


@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_log_likelihood(backend):
    p = make_problem(T=8, B=3, C=6, blank=0, target_lengths=[2, 3, 6], input_lengths=[8, 5, 5])
    d = device_for(backend)
    ll = omnifast.ctc_log_likelihood(
        p.logits.to(d),
        p.targets.to(d),
        p.input_lengths.to(d),
        p.target_lengths.to(d),
        blank=0,
        from_logits=True,
        backend=backend,
    ).cpu()
    nll = torch_loss_and_grad(p, "none")[0]
    assert_close(ll, -nll)
    assert ll[2] == -math.inf
    with torch.no_grad():
        assert_close(
            omnifast.ctc_log_likelihood(
                p.logits.log_softmax(-1).to(d), p.targets.to(d), p.input_lengths, p.target_lengths, backend=backend
            ).cpu(),
            ll,
        )


@pytest.mark.gpu_check(2)
def test_triton_loss_is_the_same_with_and_without_a_gradient():
    """The recursion meets in the middle whether or not occupancies are wanted, and both
    programs of a sequence compute log p from the same rows: the loss is bit for bit the same."""
    p = make_problem(T=11, B=4, C=6, blank=0, target_lengths=[2, 3, 4, 0], input_lengths=[11, 8, 5, 1], seed=4)
    d = device_for("triton")
    args = (p.targets.to(d), p.input_lengths.to(d), p.target_lengths.to(d))
    with torch.no_grad():
        plain = omnifast.ctc_loss_with_logits(p.logits.to(d), *args, reduction="none", backend="triton")
    tracked = omnifast.ctc_loss_with_logits(p.logits.to(d).requires_grad_(), *args, reduction="none", backend="triton")
    assert torch.equal(plain, tracked.detach())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_scales_saved_gradient(backend):
    """The gradient is formed in the forward; the backward scales it by the incoming gradient."""
    p = make_problem(T=8, B=2, C=5, blank=0, target_lengths=[2, 3])
    d = device_for(backend)
    x = p.logits.clone().to(d).requires_grad_()
    loss = omnifast.ctc_loss_with_logits(x, p.targets.to(d), p.input_lengths, p.target_lengths, backend=backend)
    (3.5 * loss).backward()
    expected = ours(p, "torch", True, "mean")[1]
    assert_close(x.grad.cpu(), 3.5 * expected)

    def weighted(name):
        z = p.logits.clone().to(device_for(name)).requires_grad_()
        per_sequence = omnifast.ctc_loss_with_logits(
            z, p.targets.to(z.device), p.input_lengths, p.target_lengths, reduction="none", backend=name
        )
        (per_sequence * torch.tensor([2.0, -1.0], dtype=torch.float64, device=z.device)).sum().backward()
        return z.grad.cpu()

    assert_close(weighted(backend), weighted("torch"))


def test_module_form():
    p = make_problem(T=8, B=2, C=5, blank=4, target_lengths=[2, 3], dtype=torch.float32)
    module = omnifast.nn.CTCLoss(blank=4, from_logits=True)
    expected = F.ctc_loss(p.logits.log_softmax(-1), p.targets, p.input_lengths, p.target_lengths, blank=4)
    assert_close(module(p.logits, p.targets, p.input_lengths, p.target_lengths), expected, torch.float32)


@pytest.mark.gpu_check(2)
@pytest.mark.parametrize("width", [500, 600])
def test_triton_with_speech_sized_tiles(width):
    """Targets padded to OpenOmni's lengths give 2W+1 = 1001 or 1201 states (the recursion's
    register tile of 1024 or 2048 states, 8 or 16 warps) and C = 2100 classes two row tiles of
    2048: the GPU's own block sizes, checked here and recorded for the AOT compile test. (The
    lengths themselves stay short: the interpreter runs a 600-frame recursion in minutes.)"""
    p = make_problem(
        T=9,
        B=2,
        C=2100,
        blank=2099,
        target_lengths=[4, 2],
        input_lengths=[9, 6],
        seed=9,
        dtype=torch.float32,
        width=width,
    )
    for from_logits in (True, False):
        expected = ours(p, "cpu", from_logits, "mean")
        actual = ours(p, "triton", from_logits, "mean")
        for a, e in zip(actual, expected):
            assert_close(a, e, torch.float32)
