"""Triton kernels of the MoE ops: top-k routing, the stable counting sort of the slots by expert,
the weighted combine (and its backward) by gather, and the grouped GEMMs over contiguous expert
segments. Nothing here reads a value back to the host: segment bounds are loaded inside the
kernels, so grids are sized for the worst case. Contracts: the ``_reference`` functions of
``omnifast/ops/moe.py`` with the same names.

As in ScatterMoE, the grouped GEMM can gather its input rows through an index (``a_rows``: the
first expert GEMM reads token rows in expert order, so the permuted copy of the tokens is never
written) and scatter its output rows through one (``c_rows``: the second GEMM writes each slot's
output at its token-major place, so the combine reads contiguous rows and no un-permute gather
runs); the weight-gradient GEMM gathers both of its operands the same way.

On sm_90 with bf16 the ops use ``torch._grouped_mm`` (CUTLASS) instead; this kernel is the path
for other architectures, float16 and sizes that one cannot take. Figures: ``docs/perf.md``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import launch, target_arch
from ._util import block_size

SORT_BLOCK = 1024  # slots per program of the counting sort


@triton.jit
def _route_kernel(
    logits_ptr,
    probs_ptr,
    weights_ptr,
    experts_ptr,
    lse_ptr,
    N,
    E,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
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
    # NaN ranks below every probability and above a chosen expert (-2), padded columns below all
    # (-3): a row of NaN still picks k distinct experts in range, the lowest first (its weights
    # stay NaN and carry the NaN to the output)
    remaining = tl.where(mask, tl.where(probs == probs, probs, -1.0), -3.0)
    chosen = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, 1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        chosen += tl.sum(tl.where(hit, probs, 0.0), 1)
        tl.store(experts_ptr + rows * TOP_K + j, best.to(tl.int64), mask=row_ok)
        tl.store(weights_ptr + rows * TOP_K + j, tl.sum(tl.where(hit, probs, 0.0), 1), mask=row_ok)
        remaining = tl.where(hit, -2.0, remaining)
    if NORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + rows * TOP_K + j, mask=row_ok, other=0.0)
            tl.store(weights_ptr + rows * TOP_K + j, w / tl.where(row_ok, chosen, 1.0), mask=row_ok)


@triton.jit
def _slot_histogram_kernel(experts_ptr, hist_ptr, slots, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[block, e]: how many slots of this block of BLOCK slots go to expert e."""
    block = tl.program_id(0)
    s = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(experts_ptr + s, mask=s < slots, other=-1)
    counts = tl.sum((e[:, None] == cols[None, :]).to(tl.int64), 0)
    tl.store(hist_ptr + block * E + cols, counts, mask=cols < E)


@triton.jit
def _slot_rank_kernel(
    experts_ptr, starts_ptr, order_ptr, position_ptr, slots, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr
):
    """Each slot's place in expert order: where its expert's slots of this block begin
    (``starts[block, e]``, from the histogram's scan) plus its rank among them (an exclusive
    prefix sum of one-hot rows), so the sort is stable and needs no atomics."""
    block = tl.program_id(0)
    s = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(experts_ptr + s, mask=s < slots, other=-1)
    one_hot = (e[:, None] == cols[None, :]).to(tl.int64)
    rank = tl.cumsum(one_hot, 0) - one_hot
    starts = tl.load(starts_ptr + block * E + cols, mask=cols < E, other=0)
    at = tl.sum(one_hot * (starts[None, :] + rank), 1)
    tl.store(position_ptr + s, at, mask=s < slots)
    tl.store(order_ptr + at, s.to(tl.int64), mask=s < slots)


@triton.jit
def _unpermute_kernel(
    y_ptr, position_ptr, weights_ptr, out_ptr, O, TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_O: tl.constexpr
):
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
def _unpermute_backward_kernel(
    grad_ptr,
    y_ptr,
    position_ptr,
    weights_ptr,
    grad_y_ptr,
    grad_w_ptr,
    O,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
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
def _through(index_ptr, rows, mine, INDEXED: tl.constexpr):
    """The rows themselves, or the rows an index maps them to (a fused gather or scatter)."""
    if INDEXED:
        return tl.load(index_ptr + rows, mask=mine, other=0)
    return rows


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    c_ptr,
    a_rows_ptr,
    c_rows_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    offsets_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_wk,
    HAS_BIAS: tl.constexpr,
    A_ROWS: tl.constexpr,
    C_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # c[c_row(m)] = a[a_row(m)] @ w[e].T (+ b[e]) for the rows m of segment e, where a_row and
    # c_row are m itself or read from a_rows / c_rows. Each row tile lies inside one segment (see
    # _tiles); the grid has room for the worst case and spare tiles (expert -1) exit.
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= 0:
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        mine = rows < tl.load(offsets_ptr + e + 1)
        a_row = _through(a_rows_ptr, rows, mine, A_ROWS)
        c_row = _through(c_rows_ptr, rows, mine, C_ROWS)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_e = w_ptr + e * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(
                a_ptr + a_row[:, None].to(tl.int64) * K + k0 + ks[None, :],
                mask=mine[:, None] & (k0 + ks[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                w_e + cols[None, :] * stride_wn + (k0 + ks[:, None]) * stride_wk,
                mask=(cols[None, :] < N) & (k0 + ks[:, None] < K),
                other=0.0,
            )
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            c_ptr + c_row[:, None].to(tl.int64) * N + cols[None, :],
            acc.to(c_ptr.dtype.element_ty),
            mask=mine[:, None] & (cols[None, :] < N),
        )


@triton.jit
def _grouped_weight_grad_kernel(
    g_ptr,
    x_ptr,
    g_rows_ptr,
    x_rows_ptr,
    grad_w_ptr,
    grad_b_ptr,
    offsets_ptr,
    N,
    K,
    BIAS_GRAD: tl.constexpr,
    G_ROWS: tl.constexpr,
    X_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grad_w[e] = g[segment e].T @ x[segment e] (N, K) and grad_b[e] = g[segment e].sum(0), with
    # the rows of g and x read in place or through g_rows / x_rows.
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
        g_row = _through(g_rows_ptr, rows, mine, G_ROWS)
        x_row = _through(x_rows_ptr, rows, mine, X_ROWS)
        g = tl.load(
            g_ptr + g_row[:, None].to(tl.int64) * N + cols_n[None, :],
            mask=mine[:, None] & (cols_n[None, :] < N),
            other=0.0,
        )
        x = tl.load(
            x_ptr + x_row[:, None].to(tl.int64) * K + cols_k[None, :],
            mask=mine[:, None] & (cols_k[None, :] < K),
            other=0.0,
        )
        if DOT_F32:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if BIAS_GRAD:
            bias += tl.sum(g.to(tl.float32), 0)
    out = grad_w_ptr + e.to(tl.int64) * N * K
    tl.store(
        out + cols_n[:, None] * K + cols_k[None, :],
        acc.to(grad_w_ptr.dtype.element_ty),
        mask=(cols_n[:, None] < N) & (cols_k[None, :] < K),
    )
    if BIAS_GRAD:
        if tl.program_id(2) == 0:
            tl.store(grad_b_ptr + e * N + cols_n, bias.to(grad_b_ptr.dtype.element_ty), mask=cols_n < N)


@triton.jit
def _segment_bias_kernel(y_ptr, b_ptr, row_expert_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m] += b[row_expert[m]], in place (the bias of torch._grouped_mm's GEMMs)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(row_expert_ptr + rows, mask=rows < M, other=0)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    at = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    y = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + expert[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(at, (y + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(g_ptr, out_ptr, offsets_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[e] = g[segment e].sum(0) in float32 (the bias gradients), one program per (expert,
    column block), rows in order: deterministic."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(
            g_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
            mask=(rows[:, None] < end) & (cols[None, :] < N),
            other=0.0,
        )
        acc += tl.sum(g.to(tl.float32), 0)
    tl.store(out_ptr + e * N + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


# --- host side --------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_in_float32(dtype: torch.dtype) -> bool:
    # The interpreter multiplies the raw bit patterns of bfloat16 operands in tl.dot
    # (triton-lang/triton#11584, not to be fixed), so interpreted runs upcast them first.
    # Compiled kernels keep bfloat16 operands for the tensor cores.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def mm_config(arch: Optional[int], dtype: torch.dtype, M: int, N: int, K: int) -> dict:
    """Tiles, warps and pipeline depth of the grouped GEMM. GPU configurations follow Triton's
    matmul tutorial for Ampere and Hopper (half precision: 128 x 128 tiles, 8 warps on sm_90 for
    its warpgroup MMA, 3-4 stages; float32: 64 x 64, 4 warps); None (the interpreter) takes
    tiles no larger than the problem. Chosen, not tuned: no GPU was lent to measure them."""
    if arch is None:
        return dict(BLOCK_M=block_size(M, 64), BLOCK_N=block_size(N, 64), BLOCK_K=block_size(K, 32), num_warps=4)
    half = dtype in (torch.bfloat16, torch.float16)
    if half and arch >= 90:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if half:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def wgrad_config(arch: Optional[int], dtype: torch.dtype, M: int, N: int, K: int) -> dict:
    if arch is None:
        return dict(BLOCK_M=block_size(M, 32), BLOCK_N=block_size(N, 64), BLOCK_K=block_size(K, 64), num_warps=4)
    half = dtype in (torch.bfloat16, torch.float16)
    if half:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def route(logits: torch.Tensor, top_k: int, normalize: bool):
    N, E = logits.shape
    logits = logits.contiguous()
    probs = torch.empty_like(logits)
    weights = logits.new_empty(N, top_k)
    experts = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    lse = logits.new_empty(N)
    BLOCK_E = block_size(E, 1 << 16)
    BLOCK_N = max(1, min(128, 4096 // BLOCK_E))
    if N:
        launch(
            _route_kernel,
            (triton.cdiv(N, BLOCK_N),),
            logits_ptr=logits,
            probs_ptr=probs,
            weights_ptr=weights,
            experts_ptr=experts,
            lse_ptr=lse,
            N=N,
            E=E,
            TOP_K=top_k,
            NORMALIZE=normalize,
            BLOCK_N=BLOCK_N,
            BLOCK_E=BLOCK_E,
        )
    return (probs, weights, experts, lse) + sort_slots(experts.view(-1), E)


def sort_slots(experts: torch.Tensor, E: int):
    """Counts (E,), offsets (E + 1,), order and position (slots,) of a stable counting sort of the
    slots by expert: a histogram per block of SORT_BLOCK slots, a scan over blocks, then each
    block ranks its slots. Two launches however many slots; nothing read back."""
    slots = experts.numel()
    device = experts.device
    blocks = max(1, triton.cdiv(slots, SORT_BLOCK))
    BLOCK_E = block_size(E, 1 << 16)
    hist = torch.zeros(blocks, E, dtype=torch.int64, device=device)
    if slots:
        launch(
            _slot_histogram_kernel,
            (blocks,),
            experts_ptr=experts,
            hist_ptr=hist,
            slots=slots,
            E=E,
            BLOCK=SORT_BLOCK,
            BLOCK_E=BLOCK_E,
        )
    counts = hist.sum(0)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    starts = (offsets[:-1][None, :] + torch.cumsum(hist, 0) - hist).contiguous()  # per block and expert
    order = torch.empty(slots, dtype=torch.int64, device=device)
    position = torch.empty_like(order)
    if slots:
        launch(
            _slot_rank_kernel,
            (blocks,),
            experts_ptr=experts,
            starts_ptr=starts,
            order_ptr=order,
            position_ptr=position,
            slots=slots,
            E=E,
            BLOCK=SORT_BLOCK,
            BLOCK_E=BLOCK_E,
        )
    return counts, offsets, order, position


def unpermute(y: torch.Tensor, position: torch.Tensor, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    y = y.contiguous()
    N, O = position.numel() // top_k, y.shape[1]
    out = y.new_empty(N, O)
    BLOCK_O = block_size(O, 1024)
    if N and O:
        launch(
            _unpermute_kernel,
            (N, triton.cdiv(O, BLOCK_O)),
            y_ptr=y,
            position_ptr=position,
            weights_ptr=weights if weights is not None else y,
            out_ptr=out,
            O=O,
            TOP_K=top_k,
            HAS_WEIGHTS=weights is not None,
            BLOCK_O=BLOCK_O,
        )
    return out


def unpermute_backward(grad_out, y, position, weights, top_k: int, want_weight_grad: bool):
    grad_out = grad_out.contiguous()
    N, O = grad_out.shape
    grad_y = grad_out.new_empty(N * top_k, O)
    grad_w = grad_out.new_empty(N, top_k, dtype=torch.float32) if want_weight_grad else None
    if N and O:
        launch(
            _unpermute_backward_kernel,
            (N,),
            grad_ptr=grad_out,
            y_ptr=y.contiguous() if want_weight_grad else grad_out,
            position_ptr=position,
            weights_ptr=weights if weights is not None else grad_out,
            grad_y_ptr=grad_y,
            grad_w_ptr=grad_w if want_weight_grad else grad_out,
            O=O,
            TOP_K=top_k,
            HAS_WEIGHTS=weights is not None,
            WEIGHT_GRAD=want_weight_grad,
            BLOCK_O=block_size(O, 1024),
        )
    elif want_weight_grad:
        grad_w.zero_()
    return grad_y, grad_w


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


def grouped_mm(
    a: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    offsets: torch.Tensor,
    transpose: bool = True,
    a_rows: Optional[torch.Tensor] = None,
    c_rows: Optional[torch.Tensor] = None,
    out_rows: Optional[int] = None,
) -> torch.Tensor:
    """Rows of segment e times w[e].T (transpose=True, w (E, N, K)) or w[e] (w (E, K, N)), plus
    b[e]. Row m of the segments reads a[a_rows[m]] (else a[m]) and writes c[c_rows[m]] (else
    c[m]); ``out_rows``: the number of rows of c (default: as many as segment rows)."""
    a = a.contiguous()
    M = a_rows.numel() if a_rows is not None else a.shape[0]
    K = a.shape[1]
    N = w.shape[1] if transpose else w.shape[2]
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose else (w.stride(2), w.stride(1))
    c = a.new_empty(out_rows if out_rows is not None else M, N)
    config = mm_config(target_arch(a.device), a.dtype, M, N, K)
    if M and N:
        tile_expert, tile_row = _tiles(offsets, M, config["BLOCK_M"])
        launch(
            _grouped_mm_kernel,
            (tile_expert.numel(), triton.cdiv(N, config["BLOCK_N"])),
            a_ptr=a,
            w_ptr=w,
            b_ptr=b if b is not None else w,
            c_ptr=c,
            a_rows_ptr=a_rows if a_rows is not None else offsets,
            c_rows_ptr=c_rows if c_rows is not None else offsets,
            tile_expert_ptr=tile_expert,
            tile_row_ptr=tile_row,
            offsets_ptr=offsets,
            N=N,
            K=K,
            stride_we=w.stride(0),
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            HAS_BIAS=b is not None,
            A_ROWS=a_rows is not None,
            C_ROWS=c_rows is not None,
            PRECISION=_precision(a.dtype),
            DOT_F32=_dot_in_float32(a.dtype),
            **config,
        )
    return c


def grouped_weight_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    experts: int,
    bias_grad: bool,
    g_rows: Optional[torch.Tensor] = None,
    x_rows: Optional[torch.Tensor] = None,
):
    """grad_w (E, N, K) = per-segment g.T @ x and grad_b (E, N) = per-segment g.sum(0), the rows
    of g and x read through g_rows / x_rows where given."""
    g, x = g.contiguous(), x.contiguous()
    N, K = g.shape[1], x.shape[1]
    M = g_rows.numel() if g_rows is not None else g.shape[0]
    grad_w = g.new_empty(experts, N, K)
    grad_b = g.new_empty(experts, N) if bias_grad else None
    config = wgrad_config(target_arch(g.device), g.dtype, M, N, K)
    if N and K:
        launch(
            _grouped_weight_grad_kernel,
            (experts, triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(K, config["BLOCK_K"])),
            g_ptr=g,
            x_ptr=x,
            g_rows_ptr=g_rows if g_rows is not None else offsets,
            x_rows_ptr=x_rows if x_rows is not None else offsets,
            grad_w_ptr=grad_w,
            grad_b_ptr=grad_b if bias_grad else grad_w,
            offsets_ptr=offsets,
            N=N,
            K=K,
            BIAS_GRAD=bias_grad,
            G_ROWS=g_rows is not None,
            X_ROWS=x_rows is not None,
            PRECISION=_precision(g.dtype),
            DOT_F32=_dot_in_float32(g.dtype),
            **config,
        )
    elif bias_grad:
        grad_b.zero_()
    return grad_w, grad_b


def add_segment_bias(y: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[m] += b[e] over the rows of each segment e, in place."""
    M, N = y.shape
    BLOCK_M, BLOCK_N = 32, block_size(N, 128)
    if M and N:
        rows = torch.arange(M, device=y.device)
        row_expert = (torch.searchsorted(offsets[1:], rows, right=True)).to(torch.int32)
        launch(
            _segment_bias_kernel,
            (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)),
            y_ptr=y,
            b_ptr=b.contiguous(),
            row_expert_ptr=row_expert,
            M=M,
            N=N,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        )
    return y


def segment_sum(g: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, N): the rows of each segment of g (M, N) summed in float32, returned in ``dtype``."""
    g = g.contiguous()
    N = g.shape[1]
    E = offsets.numel() - 1
    out = torch.empty(E, N, dtype=dtype, device=g.device)
    BLOCK_M, BLOCK_N = 32, block_size(N, 128)
    if N:
        launch(
            _segment_sum_kernel,
            (E, triton.cdiv(N, BLOCK_N)),
            g_ptr=g,
            out_ptr=out,
            offsets_ptr=offsets,
            N=N,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        )
    return out
