"""CTC forward-backward in Triton, built so that the GPU's parallel parts run in parallel and only
the recursion itself is sequential.

Four kernels, shared with fused linear-CTC and CTC-DPO (``linear_ctc.py``); each reads its rows
through strides, so time-major (T, B, C) inputs and batch-first (B, t, V) chunks take the same code:

1. ``_emissions_kernel``, one program per (sequence, frame) row: the row's log-sum-exp (logits
   only) and the emissions of the 2L+1 extended-label states, x[label] - lse, into (B, T, S).
2. ``_split_kernel`` and 3. ``_join_kernel``: the recursion, met in the middle. A sequence of
   ``frames`` frames is cut at m = ceil(frames / 2). The split runs alpha forward over [0, m)
   and beta backward over [m, frames), one program each, side by side, storing their rows in
   ONE (B, T, S) buffer (alpha's half and beta's half). The join computes log p where the
   halves meet (alpha at m - 1 against what beta at m passes back; both programs get the same
   value, bit for bit) and carries each direction on through the other's half, turning the
   stored rows into occupancies gamma = exp(alpha + beta - emission - log p) written over the
   emissions. Without a gradient only the two meeting rows are stored. In each program the
   2L+1 states of a frame stay in registers; the neighbours s-1, s-2 (s+1, s+2) come from
   ``tl.gather`` within the program, and the emissions (and the other half's rows) are loaded
   two frames ahead of the step that needs them.
4. ``_grad_kernel``, one program per row, run in the autograd backward with the upstream gradient
   folded into its coefficients: the row's base (softmax * coef for logits, 0 for log-probs) in one
   coalesced pass, then coef * gamma subtracted at the labels. No atomics: the states are sorted by
   label once per sequence, a segmented scan sums the occupancies of equal labels (the blank's
   included) and each label column is written once, so the result is deterministic.

What we took from torch's ``LossCTC.cu`` and what we changed. torch runs alpha and beta as two
kernels over the whole sequence, each a block per (sequence, tile of states) with a barrier and a
round trip through global memory every frame, and computes the gradient in a separate parallel
pass over (T, B, C): that split of the parallel gradient from the sequential recursion is what we
kept. Against it: the states stay in registers; alpha and beta run side by side over half the
frames each, so the dependent chain is T steps whichever outputs are wanted (torch: 2T); one state
buffer instead of alpha + beta (torch keeps both, (B, T, S) each); the gradient waits for the
backward, so the upstream gradient costs nothing and no (T, B, C) buffer lives between forward and
backward; and no atomics. One host read-back a call (the argument checks). Accumulation is in
float32 (float64 for float64). Measurements and estimates: ``docs/perf.md``.
Contract: ``omnifast/ops/_reference.py``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._util import as_int32, block_size

MAX_STATES = 16384  # 2L+1 held in one register tile by the recursion: targets up to 8191 units
ROW_STATES = 1024  # the row kernels walk the states in tiles of this many


@triton.jit
def _logsumexp3(a, b, c):
    m = tl.maximum(tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)
    m = tl.where(m > float("-inf"), m, 0.0)  # all -inf: 0; a NaN operand still makes the sum NaN
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m) + tl.exp(c - m))


@triton.jit
def _spread(flag, like):
    """A scalar condition as a block shaped like ``like`` (the interpreter wants masks of the
    loaded block's shape)."""
    return (like * 0 + flag.to(tl.int32)) != 0


@triton.jit
def _emissions_kernel(
    x_ptr,
    stride_xb,
    stride_xt,
    lse_ptr,
    stride_lb,
    ext_ptr,
    tgt_len_ptr,
    in_len_ptr,
    emit_ptr,
    T,
    S_max,
    V,
    rows_per_seq,
    t0,
    COMPUTE_LSE: tl.constexpr,
    READ_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Row (b, t0 + i): the row's log-sum-exp computed and stored (``COMPUTE_LSE``), loaded
    (``READ_LSE``), or neither (a normaliser of 0: log-probs, or CTC-DPO's unnormalised scores);
    then emit[b, t0 + i, s] = x[label_s] - lse."""
    row = tl.program_id(0)
    b = row // rows_per_seq
    i = row % rows_per_seq
    t = t0 + i
    acc = emit_ptr.dtype.element_ty
    if t < tl.load(in_len_ptr + b):
        x_row = x_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xt
        lse = tl.zeros([], acc)
        if COMPUTE_LSE:
            cols = tl.arange(0, BLOCK_V)
            m = tl.full([BLOCK_V], float("-inf"), acc)
            for c0 in range(0, V, BLOCK_V):
                x = tl.load(x_row + c0 + cols, mask=c0 + cols < V, other=float("-inf")).to(acc)
                m = tl.maximum(m, x)
            top = tl.max(m, 0)
            top = tl.where(top > float("-inf"), top, 0.0)
            total = tl.zeros([BLOCK_V], acc)
            for c0 in range(0, V, BLOCK_V):
                x = tl.load(x_row + c0 + cols, mask=c0 + cols < V, other=float("-inf")).to(acc)
                total += tl.exp(x - top)
            lse = top + tl.log(tl.sum(total, 0))
            tl.store(lse_ptr + b * stride_lb + i, lse)
        if READ_LSE:
            lse = tl.load(lse_ptr + b * stride_lb + i).to(acc)
        S = 2 * tl.load(tgt_len_ptr + b) + 1
        out = emit_ptr + (b.to(tl.int64) * T + t) * S_max
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            label = tl.load(ext_ptr + b * S_max + s, mask=s < S, other=0)
            tl.store(out + s, tl.load(x_row + label, mask=s < S, other=0.0).to(acc) - lse, mask=s < S)


@triton.jit
def _state_masks(ext_ptr, b, S_max, S, BLOCK_S: tl.constexpr):
    """The states of sequence b: indices, validity (s < 2L+1), and the jumps: whether s may be
    entered from s - 2 (alpha) and left for s + 2 (beta): label states whose label differs."""
    s = tl.arange(0, BLOCK_S)
    valid = s < S
    label = tl.load(ext_ptr + b * S_max + s, mask=valid, other=-1)
    before2 = tl.load(ext_ptr + b * S_max + s - 2, mask=valid & (s >= 2), other=-1)
    after2 = tl.load(ext_ptr + b * S_max + s + 2, mask=s + 2 < S, other=-1)
    jump_in = valid & (s % 2 == 1) & (s >= 2) & (label != before2)
    jump_out = valid & (s % 2 == 1) & (s + 2 < S) & (after2 != label)
    return s, valid, jump_in, jump_out


@triton.jit
def _alpha_step(a, e, s, valid, jump_in):
    """alpha at frame t from alpha at t - 1 and the emissions e of frame t."""
    step = tl.where(s >= 1, tl.gather(a, tl.maximum(s - 1, 0), 0), float("-inf"))
    skip = tl.where(jump_in, tl.gather(a, tl.maximum(s - 2, 0), 0), float("-inf"))
    return tl.where(valid, _logsumexp3(a, step, skip) + e, float("-inf"))


@triton.jit
def _beta_carry(beta, s, S, jump_out, BLOCK_S: tl.constexpr):
    """What beta at frame t + 1 contributes to state s at frame t: beta at t before its emission."""
    step = tl.where(s + 1 < S, tl.gather(beta, tl.minimum(s + 1, BLOCK_S - 1), 0), float("-inf"))
    skip = tl.where(jump_out, tl.gather(beta, tl.minimum(s + 2, BLOCK_S - 1), 0), float("-inf"))
    return _logsumexp3(beta, step, skip)


@triton.jit
def _row(buf_ptr, b, t, side, T, S_max, FULL: tl.constexpr):
    """Where the recursion keeps frame t of sequence b: every frame (FULL, (B, T, S)) or only the
    two meeting rows, alpha at m - 1 (side 0) and beta at m (side 1), in (B, 2, S)."""
    if FULL:
        return buf_ptr + (b.to(tl.int64) * T + t) * S_max
    return buf_ptr + (b.to(tl.int64) * 2 + side) * S_max


@triton.jit
def _split_kernel(
    emit_ptr, buf_ptr, ext_ptr, tgt_len_ptr, in_len_ptr, T, S_max, FULL: tl.constexpr, BLOCK_S: tl.constexpr
):
    """Grid (B, 2), the first half of the recursion: program 0 runs alpha forward over frames
    [0, m), program 1 beta backward over [m, frames), m = ceil(frames / 2), side by side."""
    b = tl.program_id(0)
    backward = tl.program_id(1) == 1
    frames = tl.load(in_len_ptr + b)
    S = 2 * tl.load(tgt_len_ptr + b) + 1
    s, valid, jump_in, jump_out = _state_masks(ext_ptr, b, S_max, S, BLOCK_S)
    m = (frames + 1) // 2
    emit = emit_ptr + b.to(tl.int64) * T * S_max
    # Each step loads the emissions two frames ahead: a load has two steps' time to arrive.
    if not backward:
        if m > 0:
            a = tl.load(emit + s, mask=valid & (s < 2), other=float("-inf"))
            if FULL:
                tl.store(_row(buf_ptr, b, 0, 0, T, S_max, FULL) + s, a, mask=valid)
            e1 = tl.load(emit + S_max + s, mask=valid & _spread(1 < m, s), other=float("-inf"))
            e2 = tl.load(emit + 2 * S_max + s, mask=valid & _spread(2 < m, s), other=float("-inf"))
            for t in range(1, m):
                e3 = tl.load(emit + (t + 2) * S_max + s, mask=valid & _spread(t + 2 < m, s), other=float("-inf"))
                a = _alpha_step(a, e1, s, valid, jump_in)
                if FULL:
                    tl.store(_row(buf_ptr, b, t, 0, T, S_max, FULL) + s, a, mask=valid)
                e1 = e2
                e2 = e3
            if not FULL:
                tl.store(_row(buf_ptr, b, m - 1, 0, T, S_max, FULL) + s, a, mask=valid)
    else:
        if m < frames:
            last = frames - 1
            e = tl.load(emit + last * S_max + s, mask=valid, other=float("-inf"))
            beta = tl.where(valid & (s >= S - 2), e, float("-inf"))
            if FULL:
                tl.store(_row(buf_ptr, b, last, 1, T, S_max, FULL) + s, beta, mask=valid)
            e1 = tl.load(emit + (last - 1) * S_max + s, mask=valid & _spread(last - 1 >= m, s), other=float("-inf"))
            e2 = tl.load(emit + (last - 2) * S_max + s, mask=valid & _spread(last - 2 >= m, s), other=float("-inf"))
            for i in range(1, frames - m):
                t = last - i
                e3 = tl.load(emit + (t - 2) * S_max + s, mask=valid & _spread(t - 2 >= m, s), other=float("-inf"))
                beta = tl.where(valid, _beta_carry(beta, s, S, jump_out, BLOCK_S) + e1, float("-inf"))
                if FULL:
                    tl.store(_row(buf_ptr, b, t, 1, T, S_max, FULL) + s, beta, mask=valid)
                e1 = e2
                e2 = e3
            if not FULL:
                tl.store(_row(buf_ptr, b, m, 1, T, S_max, FULL) + s, beta, mask=valid)


@triton.jit
def _occupancy(a, beta, e, ll):
    """gamma = exp(alpha + beta - emission - log p), 0 where no path passes or p = 0."""
    path = a + beta
    gamma = tl.where(path == float("-inf"), 0.0, tl.exp(path - e - ll))
    return tl.where(ll == float("-inf"), 0.0, gamma)


@triton.jit
def _join_kernel(
    emit_ptr, buf_ptr, ll_ptr, ext_ptr, tgt_len_ptr, in_len_ptr, T, S_max, GAMMA: tl.constexpr, BLOCK_S: tl.constexpr
):
    """After ``_split_kernel``: log p = logsumexp_s(alpha[m - 1, s] + carry[s]), carry being what
    beta at m passes back (at m = frames: 0 on the last two states). Both programs of a sequence
    compute it from the same rows with the same code, so they agree bit for bit; program 0 stores
    it. GAMMA (grid (B, 2), buffers FULL): then alpha carries on over [m, frames) and beta over
    [0, m), each turning the other's stored half into occupancies written over the emissions
    (a program reads and writes only its own frames' emissions: no race). Else grid (B,)."""
    b = tl.program_id(0)
    backward = tl.program_id(1) == 1
    acc = emit_ptr.dtype.element_ty
    frames = tl.load(in_len_ptr + b)
    length = tl.load(tgt_len_ptr + b)
    S = 2 * length + 1
    s, valid, jump_in, jump_out = _state_masks(ext_ptr, b, S_max, S, BLOCK_S)
    m = (frames + 1) // 2
    has_beta = _spread(m < frames, s)
    lo = tl.load(
        _row(buf_ptr, b, m - 1, 0, T, S_max, GAMMA) + s, mask=valid & _spread(frames > 0, s), other=float("-inf")
    )
    hi = tl.load(_row(buf_ptr, b, m, 1, T, S_max, GAMMA) + s, mask=valid & has_beta, other=float("-inf"))
    carry = tl.where(has_beta, _beta_carry(hi, s, S, jump_out, BLOCK_S), tl.where(s >= S - 2, 0.0, float("-inf")))
    carry = tl.where(valid, carry, float("-inf"))
    x = lo + carry
    top = tl.max(x, 0)
    top = tl.where(top > float("-inf"), top, 0.0)
    ll = top + tl.log(tl.sum(tl.exp(x - top), 0))  # a NaN state makes the sum NaN: it propagates
    ll = tl.where(frames > 0, ll, tl.where(length == 0, 0.0, float("-inf"))).to(acc)
    if not backward:
        tl.store(ll_ptr + b, ll)
    if GAMMA:
        emit = emit_ptr + b.to(tl.int64) * T * S_max
        if not backward:
            a = lo
            e1 = tl.load(emit + m * S_max + s, mask=valid & has_beta, other=float("-inf"))
            o1 = hi
            e2 = tl.load(emit + (m + 1) * S_max + s, mask=valid & _spread(m + 1 < frames, s), other=float("-inf"))
            o2 = tl.load(
                _row(buf_ptr, b, m + 1, 1, T, S_max, GAMMA) + s,
                mask=valid & _spread(m + 1 < frames, s),
                other=float("-inf"),
            )
            for t in range(m, frames):
                ahead = valid & _spread(t + 2 < frames, s)
                e3 = tl.load(emit + (t + 2) * S_max + s, mask=ahead, other=float("-inf"))
                o3 = tl.load(_row(buf_ptr, b, t + 2, 1, T, S_max, GAMMA) + s, mask=ahead, other=float("-inf"))
                a = _alpha_step(a, e1, s, valid, jump_in)
                tl.store(emit + t * S_max + s, _occupancy(a, o1, e1, ll), mask=valid)
                e1 = e2
                e2 = e3
                o1 = o2
                o2 = o3
        else:
            present = valid & _spread(m > 0, s)
            e1 = tl.load(emit + (m - 1) * S_max + s, mask=present, other=float("-inf"))
            o1 = lo
            e2 = tl.load(emit + (m - 2) * S_max + s, mask=valid & _spread(m >= 2, s), other=float("-inf"))
            o2 = tl.load(
                _row(buf_ptr, b, m - 2, 0, T, S_max, GAMMA) + s, mask=valid & _spread(m >= 2, s), other=float("-inf")
            )
            for i in range(0, m):
                t = m - 1 - i
                behind = valid & _spread(t >= 2, s)
                e3 = tl.load(emit + (t - 2) * S_max + s, mask=behind, other=float("-inf"))
                o3 = tl.load(_row(buf_ptr, b, t - 2, 0, T, S_max, GAMMA) + s, mask=behind, other=float("-inf"))
                beta = tl.where(valid, carry + e1, float("-inf"))
                tl.store(emit + t * S_max + s, _occupancy(o1, beta, e1, ll), mask=valid)
                carry = _beta_carry(beta, s, S, jump_out, BLOCK_S)
                e1 = e2
                e2 = e3
                o1 = o2
                o2 = o3


@triton.jit
def _segment_sum(a, a_starts, b, b_starts):
    return tl.where(b_starts, b, a + b), a_starts | b_starts


@triton.jit
def _grad_kernel(
    x_ptr,
    stride_xb,
    stride_xt,
    grad_ptr,
    lse_ptr,
    stride_lb,
    occ_ptr,
    order_ptr,
    sorted_ptr,
    tgt_len_ptr,
    in_len_ptr,
    base_coef_ptr,
    coef_ptr,
    poison_ptr,
    T,
    S_max,
    V,
    rows_per_seq,
    t0,
    BASE: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Row (b, t0 + i) of the gradient, laid out like ``x`` (``grad`` may be ``x``: in place).

    BASE: write the row first: softmax(x) * base_coef[b] (SOFTMAX) or 0, NaN for poisoned
    sequences, 0 past the input length; then set each label column to its softmax term minus
    coef[b] * (summed occupancy). Without BASE, subtract coef[b] * occupancy from what the row
    holds (a further target set). ``order``/``sorted``: each sequence's states sorted by label."""
    row = tl.program_id(0)
    b = row // rows_per_seq
    i = row % rows_per_seq
    t = t0 + i
    acc = occ_ptr.dtype.element_ty
    live = t < tl.load(in_len_ptr + b)
    poisoned = tl.load(poison_ptr + b) != 0
    x_row = x_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xt
    g_row = grad_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xt
    scatter = live & (tl.load(poison_ptr + b) == 0)
    # The label columns: states sorted by label, the occupancies of equal labels summed.
    S = 2 * tl.load(tgt_len_ptr + b) + 1
    s = tl.arange(0, BLOCK_S)
    mask = (s < S) & _spread(scatter, s)
    label = tl.load(sorted_ptr + b * S_max + s, mask=mask, other=-1)
    previous = tl.load(sorted_ptr + b * S_max + s - 1, mask=mask & (s >= 1), other=-2)
    following = tl.load(sorted_ptr + b * S_max + s + 1, mask=mask & (s + 1 < S), other=-2)
    state = tl.load(order_ptr + b * S_max + s, mask=mask, other=0)
    occupancy = tl.load(occ_ptr + (b.to(tl.int64) * T + t) * S_max + state, mask=mask, other=0.0)
    summed, _ = tl.associative_scan((occupancy, label != previous), 0, _segment_sum)
    ends = mask & (label != following)
    coef = tl.load(coef_ptr + b).to(acc)
    if BASE:
        base_coef = tl.load(base_coef_ptr + b).to(acc)
        lse = tl.zeros([], acc)
        at_label = tl.zeros([BLOCK_S], acc)
        if SOFTMAX:
            lse = tl.load(lse_ptr + b * stride_lb + i, mask=live, other=0.0).to(acc)
            at_label = tl.exp(tl.load(x_row + label, mask=ends, other=float("-inf")).to(acc) - lse) * base_coef
        tl.debug_barrier()  # every label value is read before the row is overwritten (grad may be x)
        cols = tl.arange(0, BLOCK_V)
        for c0 in range(0, V, BLOCK_V):
            in_row = c0 + cols < V
            g = tl.zeros([BLOCK_V], acc)
            if SOFTMAX:
                g = (
                    tl.exp(
                        tl.load(x_row + c0 + cols, mask=in_row & _spread(live, cols), other=float("-inf")).to(acc) - lse
                    )
                    * base_coef
                )
            g = tl.where(poisoned, float("nan"), g)
            g = tl.where(live, g, 0.0)
            tl.store(g_row + c0 + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        tl.debug_barrier()  # the row is written before its label columns are set
        tl.store(g_row + label, (at_label - coef * summed).to(grad_ptr.dtype.element_ty), mask=ends)
    else:
        current = tl.load(g_row + label, mask=ends, other=0.0).to(acc)
        tl.store(g_row + label, (current - coef * summed).to(grad_ptr.dtype.element_ty), mask=ends)


# --- host side --------------------------------------------------------------------------------


def _state_warps(block_s: int) -> int:
    return max(4, min(16, block_s // 128))


def fits(S_max: int) -> bool:
    """Whether 2L+1 states fit the recursion's one register tile."""
    return S_max <= MAX_STATES


def extended_labels(targets: torch.Tensor, target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """(B, 2W+1) int32 state labels: blank, y1, blank, ..., yW, blank (blank past 2L+1)."""
    B, W = targets.shape
    ext = torch.full((B, 2 * W + 1), blank, dtype=torch.int32, device=targets.device)
    ext[:, 1::2] = targets
    states = torch.arange(2 * W + 1, device=targets.device)
    return torch.where(states < (2 * target_lengths + 1)[:, None], ext, blank).contiguous()


def sorted_states(ext: torch.Tensor, target_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's valid states sorted by label (stable; padding states last): the state
    indices and their labels, (B, S) int32 each. Equal labels end up adjacent."""
    states = torch.arange(ext.shape[1], device=ext.device)
    keys = torch.where(states < (2 * target_lengths + 1)[:, None], ext.long(), torch.iinfo(torch.int32).max)
    labels, order = torch.sort(keys, dim=1, stable=True)
    return order.to(torch.int32).contiguous(), labels.to(torch.int32).contiguous()


NORMALISERS = ("none", "compute", "read")


def emissions(
    x: torch.Tensor,
    lse: torch.Tensor,
    ext: torch.Tensor,
    target_lengths: torch.Tensor,
    input_lengths: torch.Tensor,
    out: torch.Tensor,
    t0: int,
    normaliser: str,
) -> None:
    """Fill ``out[:, t0:t0 + t]`` (B, T, S) with the state emissions of ``x`` laid out (B, t, V)
    by its strides (last stride 1), minus the row's log-sum-exp ``lse`` (B, t) as ``normaliser``
    says: ``"compute"`` it (and store it in ``lse``), ``"read"`` it from ``lse``, or ``"none"``
    (log-probs, or unnormalised scores)."""
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {', '.join(NORMALISERS)}, got {normaliser!r}")
    B, rows, V = x.shape
    if B == 0 or rows == 0:
        return
    launch(
        _emissions_kernel,
        (B * rows,),
        x_ptr=x,
        stride_xb=x.stride(0),
        stride_xt=x.stride(1),
        lse_ptr=lse,
        stride_lb=lse.stride(0),
        ext_ptr=ext,
        tgt_len_ptr=target_lengths,
        in_len_ptr=input_lengths,
        emit_ptr=out,
        T=out.shape[1],
        S_max=out.shape[2],
        V=V,
        rows_per_seq=rows,
        t0=t0,
        COMPUTE_LSE=normaliser == "compute",
        READ_LSE=normaliser == "read",
        BLOCK_V=block_size(V, 2048),
        BLOCK_S=block_size(out.shape[2], ROW_STATES),
    )


def recursion(
    emit: torch.Tensor, ext: torch.Tensor, target_lengths: torch.Tensor, input_lengths: torch.Tensor, occupancy: bool
) -> torch.Tensor:
    """log p(y|x) (B,) from the state emissions (B, T, S); with ``occupancy`` the occupancies
    overwrite ``emit``. Two launches, each of T/2 dependent steps with alpha and beta side by
    side: ``_split_kernel`` (keeping every row in one (B, T, S) buffer, or without ``occupancy``
    only the two rows where the halves meet) and ``_join_kernel``."""
    B, T, S_max = emit.shape
    block_s = block_size(S_max, MAX_STATES)
    ll = torch.empty(B, dtype=emit.dtype, device=emit.device)
    if B == 0:
        return ll
    buf = torch.empty(B, T if occupancy else 2, S_max, dtype=emit.dtype, device=emit.device)
    warps = _state_warps(block_s)
    launch(
        _split_kernel,
        (B, 2),
        emit_ptr=emit,
        buf_ptr=buf,
        ext_ptr=ext,
        tgt_len_ptr=target_lengths,
        in_len_ptr=input_lengths,
        T=T,
        S_max=S_max,
        FULL=occupancy,
        BLOCK_S=block_s,
        num_warps=warps,
    )
    launch(
        _join_kernel,
        (B, 2) if occupancy else (B,),
        emit_ptr=emit,
        buf_ptr=buf,
        ll_ptr=ll,
        ext_ptr=ext,
        tgt_len_ptr=target_lengths,
        in_len_ptr=input_lengths,
        T=T,
        S_max=S_max,
        GAMMA=occupancy,
        BLOCK_S=block_s,
        num_warps=warps,
    )
    return ll


def gradient_rows(
    x: torch.Tensor,
    grad: torch.Tensor,
    lse: torch.Tensor,
    occ: torch.Tensor,
    order: torch.Tensor,
    labels: torch.Tensor,
    target_lengths: torch.Tensor,
    input_lengths: torch.Tensor,
    base_coef: torch.Tensor,
    coef: torch.Tensor,
    poison: torch.Tensor,
    t0: int,
    base: bool,
    softmax: bool,
) -> None:
    """Launch ``_grad_kernel`` over the (B, t, V) rows of ``x``/``grad`` (same strides)."""
    B, rows, V = x.shape
    if B == 0 or rows == 0:
        return
    S_max = occ.shape[2]
    block_s = block_size(S_max, MAX_STATES)
    launch(
        _grad_kernel,
        (B * rows,),
        x_ptr=x,
        stride_xb=x.stride(0),
        stride_xt=x.stride(1),
        grad_ptr=grad,
        lse_ptr=lse,
        stride_lb=lse.stride(0),
        occ_ptr=occ,
        order_ptr=order,
        sorted_ptr=labels,
        tgt_len_ptr=target_lengths,
        in_len_ptr=input_lengths,
        base_coef_ptr=base_coef,
        coef_ptr=coef,
        poison_ptr=poison,
        T=occ.shape[1],
        S_max=S_max,
        V=V,
        rows_per_seq=rows,
        t0=t0,
        BASE=base,
        SOFTMAX=softmax,
        BLOCK_V=block_size(V, 2048),
        BLOCK_S=block_s,
        num_warps=_state_warps(block_s),
    )


def ctc_forward(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    from_logits: bool,
    want_grad: bool,
):
    """log p(y|x) (B,) of (T, B, C) inputs and what :func:`ctc_backward` needs: (lse, occupancies,
    sorted states) or None without ``want_grad``."""
    T, B, C = inputs.shape
    acc = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    in_len, tgt_len = as_int32(input_lengths, target_lengths)
    ext = extended_labels(targets, target_lengths, blank)
    lse = torch.zeros(B, T, dtype=acc, device=inputs.device)
    emit = torch.empty(B, T, ext.shape[1], dtype=acc, device=inputs.device)
    # (T, B, C) viewed as (B, T, C) rows: stride(1) moves between sequences, stride(0) between frames
    emissions(inputs.transpose(0, 1), lse, ext, tgt_len, in_len, emit, 0, "compute" if from_logits else "none")
    ll = recursion(emit, ext, tgt_len, in_len, occupancy=want_grad)
    if not want_grad:
        return ll, None
    return ll, (lse, emit) + sorted_states(ext, target_lengths)


def ctc_backward(
    inputs: torch.Tensor,
    saved,
    target_lengths: torch.Tensor,
    input_lengths: torch.Tensor,
    coef: torch.Tensor,
    poison: torch.Tensor,
    from_logits: bool,
) -> torch.Tensor:
    """The (T, B, C) gradient in the inputs' dtype: softmax * coef - coef * gamma (logits) or
    -coef * gamma (log-probs), per sequence coefficient ``coef`` (B,); NaN rows for ``poison``."""
    lse, occ, order, labels = saved
    in_len, tgt_len = as_int32(input_lengths, target_lengths)
    grad = torch.empty_like(inputs, memory_format=torch.contiguous_format)
    coef = coef.to(occ.dtype).contiguous()
    gradient_rows(
        inputs.transpose(0, 1),
        grad.transpose(0, 1),
        lse,
        occ,
        order,
        labels,
        tgt_len,
        in_len,
        coef,
        coef,
        poison.to(torch.int8).contiguous(),
        0,
        base=True,
        softmax=from_logits,
    )
    return grad
