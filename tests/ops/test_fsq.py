"""FSQ on the C++ and Triton (interpreted) backends against the torch reference, the code <->
index round trip and the straight-through gradient."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifast.ops.fsq import fsq_codes_to_indices, fsq_constants, fsq_indices_to_codes, fsq_quantize


def away_from_ties(z, levels):
    """Nudge inputs whose bounded value sits within 1e-3 of a rounding boundary, where float
    rounding differences between exp-based and library tanh could flip the level."""
    half_level, offset, shift, _, _ = fsq_constants(levels)
    bounded = torch.tanh(z + shift) * half_level - offset
    near = ((bounded - torch.floor(bounded)) - 0.5).abs() < 1e-3
    return torch.where(near, z + 0.01, z)


@pytest.mark.gpu_check(7)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=25)
@given(
    rows=st.integers(0, 300),
    levels=st.lists(st.integers(2, 9), min_size=1, max_size=6),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(backend, rows, levels, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z = away_from_ties(torch.randn(rows, len(levels), generator=gen) * scale, levels)
    probe = torch.randn(rows, len(levels), generator=gen)
    results = []
    for b in (backend, "torch"):
        x = z.clone().requires_grad_()
        codes, indices = fsq_quantize(x, levels, backend=b)
        (grad,) = torch.autograd.grad((codes * probe).sum(), x) if rows else (torch.zeros_like(x),)
        results.append((codes, indices, grad))
    (codes, indices, grad), (ref_codes, ref_indices, ref_grad) = results
    assert torch.equal(codes, ref_codes) and torch.equal(indices, ref_indices)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@given(levels=st.lists(st.integers(2, 9), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_code_index_round_trip_covers_the_codebook(levels, seed):
    size = 1
    for level in levels:
        size *= level
    indices = torch.arange(size)
    codes = fsq_indices_to_codes(indices, levels)
    assert torch.equal(fsq_codes_to_indices(codes, levels), indices)
    assert codes.min() >= -1 and codes.max() <= 1
    z = torch.randn(50, len(levels), generator=torch.Generator().manual_seed(seed)) * 3
    codes, indices = fsq_quantize(z, levels, backend="torch")
    assert torch.equal(fsq_indices_to_codes(indices, levels), codes)
    # every level of every dimension is reachable
    big = fsq_quantize(torch.linspace(-6, 6, 2001)[:, None].expand(-1, len(levels)), levels)[0]
    for d, level in enumerate(levels):
        assert big[:, d].unique().numel() == level


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradient_passes_straight_through_and_bf16(backend):
    z = torch.zeros(3, 4, requires_grad=True)
    codes, _ = fsq_quantize(z, [8, 8, 8, 8], backend=backend)
    codes.sum().backward()
    half_level, _, shift, half_width, _ = fsq_constants([8] * 4)
    torch.testing.assert_close(z.grad, (half_level * (1 - torch.tanh(shift) ** 2) / half_width).expand(3, 4))
    codes16, indices16 = fsq_quantize(away_from_ties(torch.randn(64, 4), [8] * 4).bfloat16(), [8] * 4, backend=backend)
    assert codes16.dtype == torch.bfloat16 and indices16.dtype == torch.int64


def test_bad_input():
    with pytest.raises(ValueError, match="levels"):
        fsq_quantize(torch.zeros(2, 2), [8, 1])
    with pytest.raises(ValueError, match="z must end in 4"):
        fsq_quantize(torch.zeros(2, 3), [8] * 4)
    with pytest.raises(TypeError, match="z"):
        fsq_quantize(torch.zeros(2, 4, dtype=torch.long), [8] * 4)
    with pytest.raises(ValueError, match="codebook"):
        fsq_indices_to_codes(torch.tensor([4096]), [8] * 4)
