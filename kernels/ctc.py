"""CTC forward-backward in Triton: one program per sequence walks the frames, the extended-label
states of a frame in register tiles of ``BLOCK_S`` (one tile when 2L+1 <= BLOCK_S).

Four launches:
1. ``_row_logsumexp_kernel`` (logits only): the log_softmax normaliser of every (t, b) row.
2. ``_ctc_alpha_kernel``: state emissions and the alpha recursion; rows live in global scratch
   (B, T, S) so that frame t reads frame t-1 shifted by one and two states after a barrier.
3. ``_ctc_grad_init_kernel``: every gradient row: softmax * scale (logits) or 0 inside the input
   length, 0 past it, NaN or 0 for infeasible sequences.
4. ``_ctc_beta_grad_kernel``: the beta recursion backwards in time and the occupancies
   alpha * beta / p, subtracted from the gradient rows at their labels (atomic adds: blank and
   repeated labels share a column).
Accumulation is in float32, or float64 for float64 inputs. Contract:
``omnifast/ops/_reference.py::ctc_nll_and_grad``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _logsumexp3(a, b, c):
    m = tl.maximum(tl.maximum(a, b), c)
    m = tl.where(m > float("-inf"), m, 0.0)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m) + tl.exp(c - m))


@triton.jit
def _state_labels(tgt_ptr, s, S, blank):
    """Class of extended state s (blank on even states and outside [0, S))."""
    is_label = (s % 2 == 1) & (s < S) & (s >= 0)
    return tl.load(tgt_ptr + (s - 1) // 2, mask=is_label, other=blank)


@triton.jit
def _row_logsumexp_kernel(x_ptr, lse_ptr, in_len_ptr, B, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    t = row // B
    b = row % B
    frames = tl.load(in_len_ptr + b)
    if t < frames:
        x_row = x_ptr + row.to(tl.int64) * C
        cols = tl.arange(0, BLOCK_C)
        m = tl.full([BLOCK_C], float("-inf"), tl.float32).to(lse_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            x = tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=float("-inf"))
            m = tl.maximum(m, x.to(lse_ptr.dtype.element_ty))
        top = tl.max(m, 0)
        top = tl.where(top > float("-inf"), top, 0.0)
        total = tl.zeros([BLOCK_C], tl.float32).to(lse_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            x = tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=float("-inf"))
            total += tl.exp(x.to(lse_ptr.dtype.element_ty) - top)
        tl.store(lse_ptr + row, top + tl.log(tl.sum(total, 0)))


@triton.jit
def _ctc_alpha_kernel(x_ptr, lse_ptr, tgt_ptr, in_len_ptr, tgt_len_ptr, emit_ptr, alpha_ptr, ll_ptr,
                      T, B, C, tgt_width, S_max, blank,
                      FROM_LOGITS: tl.constexpr, BLOCK_S: tl.constexpr, GATHER: tl.constexpr = True):
    """GATHER=False: the emissions are given in ``emit_ptr`` (fused linear-CTC) instead of being
    gathered from the inputs."""
    b = tl.program_id(0)
    acc = alpha_ptr.dtype.element_ty
    frames = tl.load(in_len_ptr + b)
    length = tl.load(tgt_len_ptr + b)
    S = 2 * length + 1
    tgt = tgt_ptr + b * tgt_width
    base = b.to(tl.int64) * T * S_max
    for t in range(0, frames):
        row = base + t * S_max
        x_row = x_ptr + (t * B + b).to(tl.int64) * C
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            valid = s < S
            label = _state_labels(tgt, s, S, blank)
            jump = (s % 2 == 1) & (s >= 2) & (label != _state_labels(tgt, s - 2, S, blank))
            if GATHER:
                e = tl.load(x_row + label, mask=valid, other=float("-inf")).to(acc)
                if FROM_LOGITS:
                    e -= tl.load(lse_ptr + t * B + b)
                tl.store(emit_ptr + row + s, e, mask=valid)
            else:
                e = tl.load(emit_ptr + row + s, mask=valid, other=float("-inf"))
            prev = row - S_max
            stay = tl.load(alpha_ptr + prev + s, mask=valid & (t > 0), other=float("-inf"))
            step = tl.load(alpha_ptr + prev + s - 1, mask=valid & (t > 0) & (s >= 1), other=float("-inf"))
            skip = tl.load(alpha_ptr + prev + s - 2, mask=valid & (t > 0) & jump, other=float("-inf"))
            a = tl.where(t > 0, _logsumexp3(stay, step, skip) + e, tl.where(s < 2, e, float("-inf")))
            tl.store(alpha_ptr + row + s, a, mask=valid)
        tl.debug_barrier()
    last = base + (frames - 1) * S_max
    end = tl.load(alpha_ptr + last + S - 1, mask=frames > 0, other=float("-inf"))
    before = tl.load(alpha_ptr + last + S - 2, mask=(frames > 0) & (S > 1), other=float("-inf"))
    ll = _logsumexp3(end, before, float("-inf"))
    ll = tl.where(frames > 0, ll, tl.where(length == 0, 0.0, float("-inf")))
    tl.store(ll_ptr + b, ll)


@triton.jit
def _ctc_grad_init_kernel(x_ptr, lse_ptr, in_len_ptr, ll_ptr, scale_ptr, grad_ptr, B, C,
                          ZERO_INFINITY: tl.constexpr, FROM_LOGITS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    t = row // B
    b = row % B
    frames = tl.load(in_len_ptr + b)
    ll = tl.load(ll_ptr + b)
    scale = tl.load(scale_ptr + b)
    infeasible = ll == float("-inf")
    keep = t < frames
    if ZERO_INFINITY:
        keep = keep & (ll != float("-inf"))
    cols = tl.arange(0, BLOCK_C)
    offset = row.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        mask = c0 + cols < C
        g = tl.zeros([BLOCK_C], tl.float32).to(ll_ptr.dtype.element_ty)
        if FROM_LOGITS:
            x = tl.load(x_ptr + offset + c0 + cols, mask=mask, other=0.0).to(ll_ptr.dtype.element_ty)
            g = tl.exp(x - tl.load(lse_ptr + row)) * scale
        if not ZERO_INFINITY:
            g = tl.where(infeasible, float("nan"), g)
        tl.store(grad_ptr + offset + c0 + cols, tl.where(keep, g, 0.0), mask=mask)


@triton.jit
def _ctc_beta_grad_kernel(tgt_ptr, in_len_ptr, tgt_len_ptr, emit_ptr, alpha_ptr, beta_ptr, ll_ptr,
                          scale_ptr, grad_ptr, T, B, C, tgt_width, S_max, blank, BLOCK_S: tl.constexpr,
                          OCCUPANCY_OUT: tl.constexpr = False):
    """OCCUPANCY_OUT: write the state occupancies over the emissions (0 for infeasible
    sequences) instead of subtracting them from the gradient."""
    b = tl.program_id(0)
    ll = tl.load(ll_ptr + b)
    if OCCUPANCY_OUT:
        if ll == float("-inf"):
            frames = tl.load(in_len_ptr + b)
            S = 2 * tl.load(tgt_len_ptr + b) + 1
            for t in range(0, frames):
                for s0 in range(0, S, BLOCK_S):
                    s = s0 + tl.arange(0, BLOCK_S)
                    zero = tl.zeros([BLOCK_S], tl.float32).to(emit_ptr.dtype.element_ty)
                    tl.store(emit_ptr + b.to(tl.int64) * T * S_max + t * S_max + s, zero, mask=s < S)
    if ll != float("-inf"):
        frames = tl.load(in_len_ptr + b)
        length = tl.load(tgt_len_ptr + b)
        scale = tl.load(scale_ptr + b)
        S = 2 * length + 1
        tgt = tgt_ptr + b * tgt_width
        base = b.to(tl.int64) * T * S_max
        ping = b.to(tl.int64) * 2 * S_max
        for i in range(0, frames):
            t = frames - 1 - i
            row = base + t * S_max
            cur = ping + (t % 2) * S_max
            nxt = ping + ((t + 1) % 2) * S_max
            grad_row = grad_ptr + (t * B + b).to(tl.int64) * C
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                valid = s < S
                label = _state_labels(tgt, s, S, blank)
                ahead = _state_labels(tgt, s + 2, S, blank)
                jump = (s % 2 == 1) & (s + 2 < S) & (ahead != label)
                inner = (t + 0 * s) < frames - 1  # a block, not a scalar: the interpreter needs same-shape masks
                e = tl.load(emit_ptr + row + s, mask=valid, other=float("-inf"))
                stay = tl.load(beta_ptr + nxt + s, mask=valid & inner, other=float("-inf"))
                step = tl.load(beta_ptr + nxt + s + 1, mask=valid & inner & (s + 1 < S), other=float("-inf"))
                skip = tl.load(beta_ptr + nxt + s + 2, mask=valid & inner & jump, other=float("-inf"))
                beta = tl.where(inner, _logsumexp3(stay, step, skip) + e, tl.where(s >= S - 2, e, float("-inf")))
                tl.store(beta_ptr + cur + s, beta, mask=valid)
                path = tl.load(alpha_ptr + row + s, mask=valid, other=float("-inf")) + beta
                occupancy = tl.where(path == float("-inf"), 0.0, tl.exp(path - e - ll))
                if OCCUPANCY_OUT:
                    tl.store(emit_ptr + row + s, occupancy, mask=valid)
                else:
                    tl.atomic_add(grad_row + label, -occupancy * scale, mask=valid)
            tl.debug_barrier()


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def ctc_nll_and_grad(inputs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                     target_lengths: torch.Tensor, blank: int, zero_infinity: bool,
                     grad_scale: Optional[torch.Tensor], from_logits: bool = False):
    """Same contract as ``omnifast.ops._reference.ctc_nll_and_grad``."""
    T, B, C = inputs.shape
    acc = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    device = inputs.device
    S_max = 2 * targets.shape[1] + 1
    block_s = _block(S_max, 1024)
    block_c = _block(C, 2048)
    warps = 4 if block_s <= 256 else 8
    targets = targets.to(torch.int32).contiguous()
    in_len = input_lengths.to(torch.int32).contiguous()
    tgt_len = target_lengths.to(torch.int32).contiguous()

    lse = torch.zeros(T, B, dtype=acc, device=device)
    if from_logits:
        _row_logsumexp_kernel[(T * B,)](inputs, lse, in_len, B, C, BLOCK_C=block_c)
    emit = torch.empty(B, T, S_max, dtype=acc, device=device)
    alpha = torch.empty_like(emit)
    ll = torch.empty(B, dtype=acc, device=device)
    _ctc_alpha_kernel[(B,)](inputs, lse, targets, in_len, tgt_len, emit, alpha, ll,
                            T, B, C, targets.shape[1], S_max, blank,
                            FROM_LOGITS=from_logits, BLOCK_S=block_s, num_warps=warps)
    nll = -ll
    if zero_infinity:
        nll = torch.where(torch.isinf(nll), 0.0, nll)
    if grad_scale is None:
        return nll, None

    scale = grad_scale.to(device=device, dtype=acc).contiguous()
    grad = torch.empty(T, B, C, dtype=acc, device=device)
    _ctc_grad_init_kernel[(T * B,)](inputs, lse, in_len, ll, scale, grad, B, C,
                                    ZERO_INFINITY=zero_infinity, FROM_LOGITS=from_logits, BLOCK_C=block_c)
    beta = torch.empty(B, 2, S_max, dtype=acc, device=device)
    _ctc_beta_grad_kernel[(B,)](targets, in_len, tgt_len, emit, alpha, beta, ll, scale, grad,
                                T, B, C, targets.shape[1], S_max, blank, BLOCK_S=block_s, num_warps=warps)
    return nll, grad.to(inputs.dtype)
