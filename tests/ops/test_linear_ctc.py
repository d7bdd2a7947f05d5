"""Fused linear-CTC against the unfused path ctc_loss(log_softmax(hidden @ W.T + b))."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifast
from omnifast.ops import _reference

from ..devices import device_for
from ..tolerances import TOL, assert_all_close, value_and_grads


def make_head_problem(B, T, D, V, lengths, input_lengths, seed=0, dtype=torch.float64, bias=True, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    width = max(max(lengths), 1)
    targets = torch.randint(0, V - 1, (B, width), generator=gen)  # blank = V - 1
    return hidden, weight, b, targets, torch.tensor(input_lengths), torch.tensor(lengths)


def unfused(hidden, weight, bias, targets, input_lengths, target_lengths, reduction, zero_infinity):
    log_probs = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double()).log_softmax(-1)
    return F.ctc_loss(
        log_probs.transpose(0, 1),
        targets,
        input_lengths,
        target_lengths,
        blank=weight.shape[0] - 1,
        reduction=reduction,
        zero_infinity=zero_infinity,
    )


def head_value_and_grads(fn, hidden, weight, bias, *args, **kw):
    """Loss and gradients on the test device of ``fn.backend`` (tests/devices.py), back on the CPU."""
    return value_and_grads(fn, (hidden, weight, bias), *args, device=device_for(getattr(fn, "backend", None)), **kw)


def fused(backend, chunk_frames=None):
    def fn(hidden, weight, bias, targets, input_lengths, target_lengths, reduction, zero_infinity):
        return omnifast.linear_ctc_loss(
            hidden,
            weight,
            bias,
            targets,
            input_lengths,
            target_lengths,
            reduction=reduction,
            zero_infinity=zero_infinity,
            chunk_frames=chunk_frames,
            backend=backend,
        )

    fn.backend = backend
    return fn


@st.composite
def head_problems(draw, max_T=12, max_V=9):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_T))
    D = draw(st.integers(1, 6))
    V = draw(st.integers(2, max_V))
    input_lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    lengths = draw(st.lists(st.integers(0, 5), min_size=B, max_size=B))
    problem = make_head_problem(
        B, T, D, V, lengths, input_lengths, seed=draw(st.integers(0, 2**20)), bias=draw(st.booleans())
    )
    return problem, draw(st.sampled_from(["none", "mean", "sum"])), draw(st.booleans()), draw(st.integers(1, T + 1))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@given(case=head_problems())
def test_fused_matches_unfused(backend, case):
    (hidden, weight, bias, *targets), reduction, zero_infinity, chunk = case
    expected = head_value_and_grads(unfused, hidden, weight, bias, *targets, reduction, zero_infinity)
    actual = head_value_and_grads(fused(backend, chunk), hidden, weight, bias, *targets, reduction, zero_infinity)
    assert_all_close(actual, expected, torch.float64)


@pytest.mark.gpu_check(3)
@settings(max_examples=15)
@given(case=head_problems(max_T=7, max_V=6))
def test_triton_matches_unfused(case):
    (hidden, weight, bias, *targets), reduction, zero_infinity, chunk = case
    expected = head_value_and_grads(unfused, hidden, weight, bias, *targets, reduction, zero_infinity)
    actual = head_value_and_grads(fused("triton", chunk), hidden, weight, bias, *targets, reduction, zero_infinity)
    assert_all_close(actual, expected, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_float32_edge_cases(backend):
    """Empty targets, T=1 frames, an infeasible sequence and a short input length at once."""
    problem = make_head_problem(4, 6, 5, 7, [0, 1, 5, 2], [6, 1, 3, 4], seed=3, dtype=torch.float32)
    for zero_infinity in (False, True):
        expected = head_value_and_grads(fused("torch"), *problem, "mean", zero_infinity)
        actual = head_value_and_grads(fused(backend, 2), *problem, "mean", zero_infinity)
        assert_all_close(actual, expected, torch.float32)
        assert torch.isnan(actual[1]).any() != zero_infinity


def test_cpu_float32_at_speech_scale():
    problem = make_head_problem(2, 120, 32, 300, [40, 25], [120, 90], seed=4, dtype=torch.float32)
    truth = head_value_and_grads(unfused, *problem, "mean", False)
    reference = head_value_and_grads(fused("torch"), *problem, "mean", False)
    actual = head_value_and_grads(fused("cpu", 16), *problem, "mean", False)
    for a, r, t in zip(actual, reference, truth):
        assert (a.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-5


@pytest.mark.gpu_check(3)
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bf16_within_twice_the_reference_error(backend):
    problem = make_head_problem(2, 10, 8, 12, [3, 4], [10, 8], seed=5, dtype=torch.bfloat16)
    truth = head_value_and_grads(unfused, *problem, "mean", False)
    reference = head_value_and_grads(fused("torch"), *problem, "mean", False)
    actual = head_value_and_grads(fused(backend, 3), *problem, "mean", False)
    assert actual[1].dtype == torch.bfloat16 and actual[2].dtype == torch.bfloat16
    for a, r, t in zip(actual, reference, truth):
        assert (a.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend):
    hidden, weight, bias, targets, input_lengths, lengths = make_head_problem(2, 5, 3, 4, [2, 1], [5, 4], seed=6)
    leaves = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: omnifast.linear_ctc_loss(
            h, w, b, targets, input_lengths, lengths, chunk_frames=2, backend=backend
        ),
        leaves,
    )


def test_chunk_size_does_not_change_the_result():
    problem = make_head_problem(3, 9, 4, 6, [2, 3, 1], [9, 7, 2], seed=7)
    results = [head_value_and_grads(fused("cpu", chunk), *problem, "sum", False) for chunk in (1, 2, 4, 9, None)]
    for other in results[1:]:
        assert_all_close(other, results[0], torch.float64)


def test_no_grad_runs_only_the_first_pass(monkeypatch):
    problem = make_head_problem(2, 6, 4, 5, [2, 2], [6, 5], seed=8)

    def forbidden(*args, **kwargs):
        raise AssertionError("pass 2 ran under no_grad")

    monkeypatch.setattr(_reference, "chunk_grad", forbidden)
    with torch.no_grad():
        loss = fused("torch")(*problem, "mean", False)
    torch.testing.assert_close(loss, unfused(*problem, "mean", False))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_form_the_gradient_in_one_pass(backend, reduction, monkeypatch):
    """Their coefficients are known before the recursion: no pass 2 (no recomputed GEMM)."""
    from omnifast.ops._ctc_engine import Scorer

    def forbidden(*args, **kwargs):
        raise AssertionError("pass 2 ran")

    monkeypatch.setattr(Scorer, "gradients", forbidden)
    problem = make_head_problem(3, 7, 4, 6, [2, 3, 0], [7, 5, 3], seed=10, dtype=torch.float32)
    for zero_infinity in (False, True):
        expected = head_value_and_grads(unfused, *problem, reduction, zero_infinity)
        assert_all_close(
            head_value_and_grads(fused(backend, 3), *problem, reduction, zero_infinity), expected, torch.float32
        )


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_label_blocks_one_sequence_at_a_time(backend, monkeypatch):
    from omnifast.ops import _ctc_engine

    monkeypatch.setattr(_ctc_engine, "CHUNK_ELEMENTS", 1)  # a (T, 1 + W) block of one sequence each
    problem = make_head_problem(3, 8, 4, 7, [3, 1, 2], [8, 4, 6], seed=11, dtype=torch.float32)
    expected = head_value_and_grads(unfused, *problem, "mean", False)
    assert_all_close(head_value_and_grads(fused(backend, 3), *problem, "mean", False), expected, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_sequence_infeasible_by_its_values_is_zeroed(backend):
    """A -inf bias on the one label of sequence 0 makes it impossible although its frames
    suffice: the one pass weighted it, so its gradient is redone, and zero_infinity zeroes it.
    (F.ctc_loss gives NaN gradients at a -inf log-probability, pytorch#52241: the comparison is
    the two-pass path, reduction "none" weighted as "mean" weights.)"""
    hidden, weight, bias, targets, input_lengths, lengths = make_head_problem(
        2, 5, 3, 5, [1, 2], [5, 5], seed=12, dtype=torch.float32
    )
    targets[0, 0], targets[1, :2] = 0, torch.tensor([1, 2])
    bias[0] = float("-inf")
    problem = (hidden, weight, bias, targets, input_lengths, lengths)

    def two_pass(*args):
        per_sequence = fused(backend, 2)(*args[:6], "none", True)
        return (per_sequence / (2 * lengths.to(per_sequence.device).clamp(min=1))).sum()

    two_pass.backend = backend
    expected = head_value_and_grads(two_pass, *problem)
    actual = head_value_and_grads(fused(backend, 2), *problem, "mean", True)
    assert_all_close(actual, expected, torch.float32)
    assert torch.isfinite(actual[1]).all() and (actual[1][0] == 0).all()


def test_linear_ctc_head_is_a_linear_layer():
    linear = torch.nn.Linear(8, 11)
    head = omnifast.nn.LinearCTCHead(8, 10)
    assert head.blank == 10 and set(head.state_dict()) == set(linear.state_dict())
    head.load_state_dict(linear.state_dict())
    hidden = torch.randn(2, 7, 8)
    targets, input_lengths, lengths = torch.tensor([[1, 2, 3], [4, 4, 0]]), torch.tensor([7, 6]), torch.tensor([3, 2])
    expected = F.ctc_loss(linear(hidden).log_softmax(-1).transpose(0, 1), targets, input_lengths, lengths, blank=10)
    torch.testing.assert_close(head.loss(hidden, targets, input_lengths, lengths), expected, **TOL[torch.float32])
    ll = head.log_likelihood(hidden, targets, input_lengths, lengths)
    assert ll.shape == (2,) and (ll < 0).all()


BAD = [
    (TypeError, "hidden", dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long))),
    (ValueError, "hidden", dict(hidden=torch.zeros(3, 4))),
    (ValueError, "weight", dict(weight=torch.zeros(6, 5))),
    (ValueError, "bias", dict(bias=torch.zeros(5))),
    (TypeError, "bias", dict(bias=torch.zeros(6, dtype=torch.long))),
    (ValueError, "targets", dict(targets=torch.tensor([[1, 6], [2, 2]]))),
    (ValueError, "blank", dict(targets=torch.tensor([[1, 5], [2, 2]]))),
    (ValueError, "input_lengths", dict(input_lengths=torch.tensor([4, 3]))),
    (ValueError, "target_lengths", dict(target_lengths=torch.tensor([3, 1]))),
    (ValueError, "reduction", dict(reduction="avg")),
    (ValueError, "chunk_frames", dict(chunk_frames=0)),
    (ValueError, "targets", dict(targets=torch.tensor([[1, 2]]))),
]


@pytest.mark.parametrize("error,name,changes", BAD, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(error, name, changes):
    kwargs = dict(
        hidden=torch.randn(2, 3, 4),
        weight=torch.randn(6, 4),
        bias=torch.randn(6),
        targets=torch.tensor([[1, 2], [2, 2]]),
        input_lengths=torch.tensor([3, 2]),
        target_lengths=torch.tensor([2, 1]),
    )
    kwargs.update(changes)
    with pytest.raises(error, match=name):
        omnifast.linear_ctc_loss(**kwargs)


@pytest.mark.gpu_check(3)
def test_triton_with_speech_sized_tiles_under_autocast():
    """bf16 chunks under autocast with the GPU's block sizes (V = 2100: two row tiles of 2048;
    targets padded to 500: 1001 states), against the C++ backend; recorded for the AOT test."""
    problem = make_head_problem(2, 9, 16, 2100, [4, 2], [9, 6], seed=12, dtype=torch.float32)
    hidden, weight, bias, targets, input_lengths, lengths = problem
    targets = torch.cat([targets, torch.zeros(2, 500 - targets.shape[1], dtype=targets.dtype)], 1)
    results = []
    for backend in ("cpu", "triton"):
        with torch.autocast(device_for(backend).type, dtype=torch.bfloat16):
            results.append(
                head_value_and_grads(
                    fused(backend, 4), hidden, weight, bias, targets, input_lengths, lengths, "mean", False
                )
            )
    for a, e in zip(*results):
        torch.testing.assert_close(a.double(), e.double(), atol=1e-2, rtol=2e-2)
