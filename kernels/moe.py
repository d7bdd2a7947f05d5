"""Triton kernels of the MoE ops: top-k routing, the stable counting sort of the slots by
expert, the weighted combine (and its backward) by gather, and the grouped GEMM over contiguous
expert segments with its weight-gradient counterpart. Nothing here reads a value back to the
host: segment bounds are loaded inside the kernels, so grids are sized for the worst case.
Contracts: the ``_reference`` functions of ``omnifast/ops/moe.py`` with the same names."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch
from .ctc import _block


@triton.jit
def _route_kernel(logits_ptr, probs_ptr, weights_ptr, experts_ptr, lse_ptr, N, E,
                  TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=float("-inf"))
    top = tl.max(x, 1)
    top = tl.where(top > float("-inf"), top, 0.0)  # padded rows stay finite
    unnormalised = tl.exp(x - top[:, None])
    total = tl.where(row_ok, tl.sum(unnormalised, 1), 1.0)  # padded rows: no 0 / 0
    probs = unnormalised / total[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], probs, mask=mask)
    tl.store(lse_ptr + rows, top + tl.log(total), mask=row_ok)
    remaining = tl.where(mask, probs, -1.0)  # padded columns lose to every probability
    chosen = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, 1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        chosen += tl.sum(tl.where(hit, remaining, 0.0), 1)
        tl.store(experts_ptr + rows * TOP_K + j, best.to(tl.int64), mask=row_ok)
        tl.store(weights_ptr + rows * TOP_K + j, tl.sum(tl.where(hit, probs, 0.0), 1), mask=row_ok)
        remaining = tl.where(hit, -1.0, remaining)
    if NORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + rows * TOP_K + j, mask=row_ok, other=0.0)
            tl.store(weights_ptr + rows * TOP_K + j, w / tl.where(row_ok, chosen, 1.0), mask=row_ok)


@triton.jit
def _sort_slots_kernel(experts_ptr, counts_ptr, offsets_ptr, order_ptr, position_ptr, slots, E,
                       BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    # One program: a histogram pass, then a pass that ranks each slot among the earlier slots
    # of its expert (an exclusive prefix sum of one-hot rows), which keeps the sort stable.
    cols = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.int64)
    for s0 in range(0, slots, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        e = tl.load(experts_ptr + s, mask=s < slots, other=-1)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int64), 0)
    starts = tl.cumsum(counts, 0) - counts
    tl.store(counts_ptr + cols, counts, mask=cols < E)
    tl.store(offsets_ptr + cols, starts, mask=cols < E)
    tl.store(offsets_ptr + E + cols, tl.sum(counts, 0) + 0 * cols, mask=cols == 0)
    for s0 in range(0, slots, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        e = tl.load(experts_ptr + s, mask=s < slots, other=-1)
        one_hot = (e[:, None] == cols[None, :]).to(tl.int64)
        rank = tl.cumsum(one_hot, 0) - one_hot
        at = tl.sum(one_hot * (starts[None, :] + rank), 1)
        tl.store(position_ptr + s, at, mask=s < slots)
        tl.store(order_ptr + at, s.to(tl.int64), mask=s < slots)
        starts += tl.sum(one_hot, 0)


@triton.jit
def _unpermute_kernel(y_ptr, position_ptr, weights_ptr, out_ptr, O,
                      TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_O: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros([BLOCK_O], tl.float32)
    for j in tl.static_range(TOP_K):
        at = tl.load(position_ptr + n * TOP_K + j)
        row = tl.load(y_ptr + at * O + cols, mask=cols < O, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            row = row * tl.load(weights_ptr + n * TOP_K + j)
        acc += row
    tl.store(out_ptr + n.to(tl.int64) * O + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < O)


@triton.jit
def _unpermute_backward_kernel(grad_ptr, y_ptr, position_ptr, weights_ptr, grad_y_ptr, grad_w_ptr, O,
                               TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                               BLOCK_O: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_O)
    for j in tl.static_range(TOP_K):
        at = tl.load(position_ptr + n * TOP_K + j)
        scale = tl.load(weights_ptr + n * TOP_K + j) if HAS_WEIGHTS else 1.0
        dot = tl.zeros([BLOCK_O], tl.float32)
        for o0 in range(0, O, BLOCK_O):
            mask = o0 + cols < O
            g = tl.load(grad_ptr + n.to(tl.int64) * O + o0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + at * O + o0 + cols, (g * scale).to(grad_y_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:
                dot += g * tl.load(y_ptr + at * O + o0 + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHT_GRAD:
            tl.store(grad_w_ptr + n * TOP_K + j, tl.sum(dot, 0))


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, N, K,
                       stride_we, stride_wn, stride_wk, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[m] = x[m] @ w[e].T (+ b[e]) for the rows m of segment e. Each row tile lies inside one
    # segment (see _tiles); the grid has room for the worst case and spare tiles (expert -1) exit.
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= 0:
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        mine = rows < tl.load(offsets_ptr + e + 1)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_e = w_ptr + e * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_ptr + rows[:, None] * K + k0 + ks[None, :],
                        mask=mine[:, None] & (k0 + ks[None, :] < K), other=0.0)
            b = tl.load(w_e + cols[None, :] * stride_wn + (k0 + ks[:, None]) * stride_wk,
                        mask=(cols[None, :] < N) & (k0 + ks[:, None] < K), other=0.0)
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mine[:, None] & (cols[None, :] < N))


@triton.jit
def _grouped_weight_grad_kernel(g_ptr, x_ptr, grad_w_ptr, grad_b_ptr, offsets_ptr, N, K,
                                BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad_w[e] = g[segment e].T @ x[segment e] (N, K), and grad_b[e] = g[segment e].sum(0).
    e = tl.program_id(0)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    bias = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mine = rows < end
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * N + cols_n[None, :],
                    mask=mine[:, None] & (cols_n[None, :] < N), other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols_k[None, :],
                    mask=mine[:, None] & (cols_k[None, :] < K), other=0.0)
        if DOT_F32:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if BIAS_GRAD:
            bias += tl.sum(g.to(tl.float32), 0)
    out = grad_w_ptr + e.to(tl.int64) * N * K
    tl.store(out + cols_n[:, None] * K + cols_k[None, :], acc.to(grad_w_ptr.dtype.element_ty),
             mask=(cols_n[:, None] < N) & (cols_k[None, :] < K))
    if BIAS_GRAD:
        if tl.program_id(2) == 0:
            tl.store(grad_b_ptr + e * N + cols_n, bias.to(grad_b_ptr.dtype.element_ty), mask=cols_n < N)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_in_float32(dtype: torch.dtype) -> bool:
    # The interpreter multiplies the raw bit patterns of bfloat16 operands in tl.dot
    # (triton-lang/triton#11584, not to be fixed), so interpreted runs upcast them first.
    # Compiled kernels keep bfloat16 operands for the tensor cores.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def route(logits: torch.Tensor, top_k: int, normalize: bool):
    N, E = logits.shape
    logits = logits.contiguous()
    probs = torch.empty_like(logits)
    weights = logits.new_empty(N, top_k)
    experts = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    lse = logits.new_empty(N)
    BLOCK_E = _block(E, 1 << 16)
    BLOCK_N = max(1, min(128, 4096 // BLOCK_E))
    if N:
        launch(_route_kernel, (triton.cdiv(N, BLOCK_N),), logits, probs, weights, experts, lse, N, E, TOP_K=top_k,
                                                  NORMALIZE=normalize, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E)
    counts = torch.empty(E, dtype=torch.int64, device=logits.device)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=logits.device)
    order = torch.empty(N * top_k, dtype=torch.int64, device=logits.device)
    position = torch.empty_like(order)
    launch(_sort_slots_kernel, (1,), experts, counts, offsets, order, position, N * top_k, E,
                             BLOCK=max(16, min(1024, 16384 // BLOCK_E)), BLOCK_E=BLOCK_E)
    return probs, weights, experts, lse, counts, offsets, order, position


def unpermute(y: torch.Tensor, position: torch.Tensor, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    y = y.contiguous()
    N, O = position.numel() // top_k, y.shape[1]
    out = y.new_empty(N, O)
    BLOCK_O = _block(O, 1024)
    if N and O:
        launch(_unpermute_kernel, (N, triton.cdiv(O, BLOCK_O)), y, position, weights if weights is not None else y, out, O,
                                                        TOP_K=top_k, HAS_WEIGHTS=weights is not None, BLOCK_O=BLOCK_O)
    return out


def unpermute_backward(grad_out, y, position, weights, top_k: int, want_weight_grad: bool):
    grad_out = grad_out.contiguous()
    N, O = grad_out.shape
    grad_y = grad_out.new_empty(N * top_k, O)
    grad_w = grad_out.new_empty(N, top_k, dtype=torch.float32) if want_weight_grad else None
    if N and O:
        launch(_unpermute_backward_kernel, (N,),
            grad_out, y.contiguous() if want_weight_grad else grad_out, position,
            weights if weights is not None else grad_out, grad_y, grad_w if want_weight_grad else grad_out, O,
            TOP_K=top_k, HAS_WEIGHTS=weights is not None, WEIGHT_GRAD=want_weight_grad,
            BLOCK_O=_block(O, 1024))
    elif want_weight_grad:
        grad_w.zero_()
    return grad_y, grad_w


def _mm_blocks(M: int, N: int, K: int):
    return _block(M, 64), _block(N, 64), _block(K, 32)


def _tiles(offsets: torch.Tensor, rows: int, block_m: int):
    """Row tiles that never straddle two segments, computed on the device (no host sync):
    for each of the cdiv(rows, block_m) + E possible tiles its expert (-1: spare) and first row."""
    E = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(per_expert, 0)
    tile = torch.arange(triton.cdiv(rows, block_m) + E, device=offsets.device)
    expert = torch.searchsorted(tile_end, tile, right=True)
    owner = expert.clamp(max=E - 1)
    first_row = offsets[owner] + (tile - (tile_end - per_expert)[owner]) * block_m
    return torch.where(expert < E, owner, -1), first_row


def grouped_mm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], offsets: torch.Tensor,
               transpose: bool = True) -> torch.Tensor:
    """Rows of segment e times w[e].T (transpose=True, w (E, N, K)) or w[e] (w (E, K, N))."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[1] if transpose else w.shape[2]
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose else (w.stride(2), w.stride(1))
    y = x.new_empty(M, N)
    BLOCK_M, BLOCK_N, BLOCK_K = _mm_blocks(M, N, K)
    if M and N:
        tile_expert, tile_row = _tiles(offsets, M, BLOCK_M)
        launch(_grouped_mm_kernel, (tile_expert.numel(), triton.cdiv(N, BLOCK_N)),
            x, w, b if b is not None else w, y, tile_expert, tile_row, offsets, N, K, w.stride(0), stride_wn, stride_wk,
            HAS_BIAS=b is not None, PRECISION=_precision(x.dtype), DOT_F32=_dot_in_float32(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def grouped_weight_grad(g: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, experts: int, bias_grad: bool):
    """grad_w (E, N, K) = per-segment g.T @ x and grad_b (E, N) = per-segment g.sum(0)."""
    g, x = g.contiguous(), x.contiguous()
    M, N = g.shape
    K = x.shape[1]
    grad_w = g.new_empty(experts, N, K)
    grad_b = g.new_empty(experts, N) if bias_grad else None
    BLOCK_M, BLOCK_N, BLOCK_K = _block(M, 32), _block(N, 64), _block(K, 64)
    if N and K:
        launch(_grouped_weight_grad_kernel, (experts, triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K)),
            g, x, grad_w, grad_b if bias_grad else grad_w, offsets, N, K, BIAS_GRAD=bias_grad,
            PRECISION=_precision(g.dtype), DOT_F32=_dot_in_float32(g.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    elif bias_grad:
        grad_b.zero_()
    return grad_w, grad_b
