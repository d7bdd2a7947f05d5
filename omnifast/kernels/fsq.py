"""Triton kernels of finite scalar quantisation: a block of rows per program, bounded, rounded
(half to even, as torch.round), scaled and folded into code indices in one pass; the backward
recomputes tanh from z. Contract: ``fsq_forward`` / ``fsq_backward`` of ``omnifast/ops/_reference.py``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._util import block_size


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _fsq_forward_kernel(
    z_ptr,
    half_level_ptr,
    offset_ptr,
    shift_ptr,
    half_width_ptr,
    basis_ptr,
    codes_ptr,
    indices_ptr,
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (dims[None, :] < D)
    z = tl.load(z_ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    half_level = tl.load(half_level_ptr + dims, mask=dims < D, other=1.0)
    offset = tl.load(offset_ptr + dims, mask=dims < D, other=0.0)
    shift = tl.load(shift_ptr + dims, mask=dims < D, other=0.0)
    half_width = tl.load(half_width_ptr + dims, mask=dims < D, other=1.0)
    basis = tl.load(basis_ptr + dims, mask=dims < D, other=0)
    q = _round_half_even(_tanh(z + shift[None, :]) * half_level[None, :] - offset[None, :])
    tl.store(
        codes_ptr + rows[:, None] * D + dims[None, :],
        (q / half_width[None, :]).to(codes_ptr.dtype.element_ty),
        mask=mask,
    )
    nan = mask & (q != q)
    digits = (tl.where(nan, 0.0, q) + half_width[None, :]).to(tl.int64) * basis[None, :]
    index = tl.sum(tl.where(mask, digits, 0), 1)
    index = tl.where(tl.sum(nan.to(tl.int32), 1) > 0, -1, index)  # a row holding NaN has no code: -1
    tl.store(indices_ptr + rows, index, mask=rows < N)


@triton.jit
def _fsq_backward_kernel(
    grad_ptr,
    z_ptr,
    half_level_ptr,
    shift_ptr,
    half_width_ptr,
    grad_z_ptr,
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (dims[None, :] < D)
    at = rows[:, None] * D + dims[None, :]
    z = tl.load(z_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
    half_level = tl.load(half_level_ptr + dims, mask=dims < D, other=1.0)
    shift = tl.load(shift_ptr + dims, mask=dims < D, other=0.0)
    half_width = tl.load(half_width_ptr + dims, mask=dims < D, other=1.0)
    t = _tanh(z + shift[None, :])
    tl.store(
        grad_z_ptr + at,
        (g * half_level[None, :] * (1.0 - t * t) / half_width[None, :]).to(grad_z_ptr.dtype.element_ty),
        mask=mask,
    )


def _blocks(D: int):
    BLOCK_D = block_size(D, 1 << 12)
    return max(1, 4096 // BLOCK_D), BLOCK_D


def fsq_forward(z, half_level, offset, shift, half_width, basis):
    z = z.contiguous()
    N, D = z.shape
    codes = torch.empty_like(z)
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    BLOCK_N, BLOCK_D = _blocks(D)
    if N:
        launch(
            _fsq_forward_kernel,
            (triton.cdiv(N, BLOCK_N),),
            z_ptr=z,
            half_level_ptr=half_level,
            offset_ptr=offset,
            shift_ptr=shift,
            half_width_ptr=half_width,
            basis_ptr=basis,
            codes_ptr=codes,
            indices_ptr=indices,
            N=N,
            D=D,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
        )
    return codes, indices


def fsq_backward(grad_codes, z, half_level, shift, half_width):
    z, grad_codes = z.contiguous(), grad_codes.contiguous()
    N, D = z.shape
    grad_z = torch.empty_like(z)
    BLOCK_N, BLOCK_D = _blocks(D)
    if N:
        launch(
            _fsq_backward_kernel,
            (triton.cdiv(N, BLOCK_N),),
            grad_ptr=grad_codes,
            z_ptr=z,
            half_level_ptr=half_level,
            shift_ptr=shift,
            half_width_ptr=half_width,
            grad_z_ptr=grad_z,
            N=N,
            D=D,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
        )
    return grad_z
