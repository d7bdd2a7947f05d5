"""Finite scalar quantisation (FSQ, Mentzer et al. 2023), as used by EMOVA's speech tokenizer:
each of D dimensions is bounded with a shifted tanh to ``levels[d]`` values and rounded, with a
straight-through gradient; a code vector maps to one index in [0, prod(levels)).

``fsq_quantize`` runs bound, round, scale and index in one kernel per backend (torch reference,
C++, Triton); the backward recomputes tanh from the input instead of saving it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ._dispatch import choose_backend, fsq_kernels
from .checks import check_tensor

EPS = 1e-3  # keeps the bound just outside the last level, so every level is reachable


def check_levels(levels: Sequence[int]) -> Tuple[int, ...]:
    levels = tuple(levels)
    if not levels or not all(isinstance(l, int) and not isinstance(l, bool) and l >= 2 for l in levels):
        raise ValueError(f"levels must be a non-empty sequence of ints >= 2, got {levels!r}")
    if math.prod(levels) > 2**63:
        raise ValueError(f"levels give a codebook of {math.prod(levels)} codes; indices are int64, so at most 2**63")
    return levels


def fsq_constants(levels: Sequence[int], device=None):
    """Per-dimension (half_level, offset, shift, half_width) float32 and basis int64."""
    L = torch.tensor(check_levels(levels), dtype=torch.float64)
    half_level = (L - 1) * (1 + EPS) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_level)
    half_width = torch.floor(L / 2)
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), dtype=torch.int64), 0)
    return tuple(t.to(device=device, dtype=torch.float32) for t in (half_level, offset, shift, half_width)) + (
        basis.to(device),
    )


class _FSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, constants, backend):
        kernels = fsq_kernels(backend)
        half_level, offset, shift, half_width, basis = constants
        codes, indices = kernels.fsq_forward(z, half_level, offset, shift, half_width, basis)
        ctx.save_for_backward(z)
        ctx.constants, ctx.kernels = constants, kernels
        ctx.mark_non_differentiable(indices)
        return codes, indices

    @staticmethod
    def backward(ctx, grad_codes, _):
        (z,) = ctx.saved_tensors
        half_level, _, shift, half_width, _ = ctx.constants
        return ctx.kernels.fsq_backward(grad_codes.contiguous(), z, half_level, shift, half_width), None, None


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], backend: Optional[str] = None):
    """Quantise ``z`` (..., D) with ``levels`` (D values): codes (..., D) in [-1, 1] (the input
    dtype; straight-through gradient) and indices (...,) int64 in [0, prod(levels)). NaN stays
    NaN in the codes, and the index of a row holding NaN is -1; +-inf saturates to the end
    levels."""
    check_tensor("z", z, floating=True)
    levels = check_levels(levels)
    if z.dim() == 0 or z.shape[-1] != len(levels):
        raise ValueError(f"z must end in {len(levels)} dimensions (one per level), got shape {tuple(z.shape)}")
    constants = fsq_constants(levels, z.device)
    flat = z.reshape(-1, len(levels))
    codes, indices = _FSQ.apply(flat, constants, choose_backend(z.device, backend))
    return codes.view(z.shape), indices.view(z.shape[:-1])


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Indices (...,) -> codes (..., D)."""
    check_tensor("indices", indices, integer=True)
    levels = check_levels(levels)
    size = 1
    for level in levels:
        size *= level
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(
            f"indices must be in [0, {size}) (the codebook size), got values in "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    _, _, _, half_width, basis = fsq_constants(levels, indices.device)
    digits = (indices[..., None] // basis) % torch.tensor(levels, device=indices.device)
    return ((digits - half_width) / half_width).to(dtype)


def fsq_codes_to_indices(codes: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Codes (..., D) -> indices (...,)."""
    levels = check_levels(levels)
    _, _, _, half_width, basis = fsq_constants(levels, codes.device)
    return ((torch.round(codes.float() * half_width) + half_width).long() * basis).sum(-1)
