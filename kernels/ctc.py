"""CTC forward-backward in Triton, built so that the GPU's parallel parts run in parallel and only
the recursion itself is sequential.

Four kernels, shared with fused linear-CTC and CTC-DPO (``linear_ctc.py``); each reads its rows
through strides, so time-major (T, B, C) inputs and batch-first (B, t, V) chunks take the same code:

1. ``_emissions_kernel``, one program per (sequence, frame) row: the row's log-sum-exp (logits
   only) and the emissions of the 2L+1 extended-label states, x[label] - lse, into (B, T, S).
2. ``_recursion_kernel``, one program per (sequence, direction): alpha forward or beta backward in
   time. The 2L+1 states of a frame stay in registers; the shifted neighbours s-1, s-2 (s+1, s+2)
   come from ``tl.gather`` within the program, so a step never round-trips through global memory,
   and the next frame's emissions are loaded before the current step is computed. Modes: alpha and
   beta concurrently (grid (B, 2)), alpha alone, or beta writing the occupancies over the
   emissions as it goes (beta is never stored: one (B, T, S) buffer less).
3. ``_occupancy_kernel``, parallel over rows: gamma = exp(alpha + beta - emission - log p).
4. ``_grad_kernel``, one program per row, run in the autograd backward with the upstream gradient
   folded into its coefficients: the row's base (softmax * coef for logits, 0 for log-probs) in one
   coalesced pass, then coef * gamma subtracted at the labels. No atomics: the states are sorted by
   label once per sequence, a segmented scan sums the occupancies of equal labels (the blank's
   included) and each label column is written once, so the result is deterministic.

What changed against the first version (measured on an H100 at (16,1200,6561,500), see
../shared/perf/h100-2026-11-24.md): there, one program per sequence (16 programs on 132 SMs) ran the
recursion through global-memory rows behind a barrier every frame (alpha 1.86 ms) and wrote the
whole (T, B, C) gradient from inside the sequential beta loop with atomics (7.73 ms). As torch's
LossCTC.cu does, the gradient now is a separate, fully parallel pass; unlike it, the gradient waits
for the backward (so the upstream gradient costs nothing extra and no (T, B, C) buffer lives between
forward and backward), and no atomics are used.

Estimate for ctc_loss_with_logits at (B16, T1200, C6561, L500), fp32, H100 (3 TB/s measured):
emissions read 504 MB of logits (~0.2 ms); the recursion does 1200 dependent steps of a
1024-state vector per program (two ``tl.gather`` through shared memory, 3 exp + 1 log, one store
that nothing waits on): ~150-300 ns a step, 0.2-0.4 ms with alpha and beta side by side; the
occupancy pass moves 4 x 77 MB (~0.1 ms); the gradient reads 504 MB and writes 504 MB (~0.35 ms).
About 1.0-1.2 ms of kernels against torch's 6.65 ms: unmeasured, no GPU was lent to this session.
Accumulation is in float32 (float64 for float64). Contract: ``omnifast/ops/_reference.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import launch

NEG_INF = float("-inf")
MAX_STATES = 16384  # 2L+1 held in one register tile by the recursion: targets up to 8191 units
ROW_STATES = 1024   # the row kernels walk the states in tiles of this many


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
def _emissions_kernel(x_ptr, stride_xb, stride_xt, lse_ptr, stride_lb, ext_ptr, tgt_len_ptr, in_len_ptr,
                      emit_ptr, T, S_max, V, rows_per_seq, t0,
                      LSE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row (b, t0 + i): LSE=0 no normaliser (log-probs, or CTC-DPO's unnormalised scores),
    1 compute and store it, 2 load it; then emit[b, t0 + i, s] = x[label_s] - lse."""
    row = tl.program_id(0)
    b = row // rows_per_seq
    i = row % rows_per_seq
    t = t0 + i
    acc = emit_ptr.dtype.element_ty
    if t < tl.load(in_len_ptr + b):
        x_row = x_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xt
        lse = tl.zeros([], acc)
        if LSE == 1:
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
        if LSE == 2:
            lse = tl.load(lse_ptr + b * stride_lb + i).to(acc)
        S = 2 * tl.load(tgt_len_ptr + b) + 1
        out = emit_ptr + (b.to(tl.int64) * T + t) * S_max
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            label = tl.load(ext_ptr + b * S_max + s, mask=s < S, other=0)
            tl.store(out + s, tl.load(x_row + label, mask=s < S, other=0.0).to(acc) - lse, mask=s < S)


@triton.jit
def _recursion_kernel(emit_ptr, alpha_ptr, beta_ptr, ll_ptr, ext_ptr, tgt_len_ptr, in_len_ptr, T, S_max,
                      MODE: tl.constexpr, BLOCK_S: tl.constexpr):
    """MODE 0: grid (B, 2), alpha (program 0) and beta (program 1) side by side, both stored.
    MODE 1: grid (B,), alpha only. MODE 2: grid (B,), beta, writing the occupancies over the
    emissions (needs alpha and log p; 0 for infeasible sequences). Alpha writes log p (B,)."""
    b = tl.program_id(0)
    backward = (tl.program_id(1) == 1) | (MODE == 2)  # program_id(1) is 0 on a 1-D grid
    acc = emit_ptr.dtype.element_ty
    frames = tl.load(in_len_ptr + b)
    length = tl.load(tgt_len_ptr + b)
    S = 2 * length + 1
    s = tl.arange(0, BLOCK_S)
    valid = s < S
    label = tl.load(ext_ptr + b * S_max + s, mask=valid, other=-1)
    base = b.to(tl.int64) * T * S_max
    if not backward:
        before2 = tl.load(ext_ptr + b * S_max + s - 2, mask=valid & (s >= 2), other=-1)
        jump = valid & (s % 2 == 1) & (s >= 2) & (label != before2)  # may enter s from s - 2
        e = tl.load(emit_ptr + base + s, mask=valid & (s < 2) & _spread(frames > 0, s), other=float("-inf"))
        a = e
        tl.store(alpha_ptr + base + s, a, mask=valid & _spread(frames > 0, s))
        e = tl.load(emit_ptr + base + S_max + s, mask=valid & _spread(frames > 1, s), other=float("-inf"))
        for t in range(1, frames):
            e_next = tl.load(emit_ptr + base + (t + 1) * S_max + s, mask=valid & _spread(t + 1 < frames, s),
                             other=float("-inf"))
            step = tl.where(s >= 1, tl.gather(a, tl.maximum(s - 1, 0), 0), float("-inf"))
            skip = tl.where(jump, tl.gather(a, tl.maximum(s - 2, 0), 0), float("-inf"))
            a = tl.where(valid, _logsumexp3(a, step, skip) + e, float("-inf"))
            tl.store(alpha_ptr + base + t * S_max + s, a, mask=valid)
            e = e_next
        end = tl.sum(tl.where(s == S - 1, a, 0.0), 0)  # a sum picks one state and keeps NaN (a max would not)
        before = tl.where(S > 1, tl.sum(tl.where(s == S - 2, a, 0.0), 0), float("-inf"))
        ll = _logsumexp3(end, before, float("-inf"))
        ll = tl.where(frames > 0, ll, tl.where(length == 0, 0.0, float("-inf")))
        tl.store(ll_ptr + b, ll.to(acc))
    else:
        after2 = tl.load(ext_ptr + b * S_max + s + 2, mask=s + 2 < S, other=-1)
        jump = valid & (s % 2 == 1) & (s + 2 < S) & (after2 != label)  # may leave s for s + 2
        ll = tl.zeros([], acc)
        if MODE == 2:
            ll = tl.load(ll_ptr + b)
        last = frames - 1
        present = valid & _spread(frames > 0, s)
        e = tl.load(emit_ptr + base + last * S_max + s, mask=present, other=float("-inf"))
        a = tl.full([BLOCK_S], float("-inf"), acc)
        if MODE == 2:
            a = tl.load(alpha_ptr + base + last * S_max + s, mask=present, other=float("-inf"))
        beta = tl.where(s >= S - 2, e, float("-inf"))
        for i in range(0, frames):
            t = last - i
            row = base + t * S_max
            if i > 0:
                step = tl.where(s + 1 < S, tl.gather(beta, tl.minimum(s + 1, BLOCK_S - 1), 0), float("-inf"))
                skip = tl.where(jump, tl.gather(beta, tl.minimum(s + 2, BLOCK_S - 1), 0), float("-inf"))
                beta = tl.where(valid, _logsumexp3(beta, step, skip) + e, float("-inf"))
            earlier = valid & _spread(t >= 1, s)  # prefetch frame t - 1 before this frame's results are stored
            e_next = tl.load(emit_ptr + row - S_max + s, mask=earlier, other=float("-inf"))
            a_next = a
            if MODE == 2:
                a_next = tl.load(alpha_ptr + row - S_max + s, mask=earlier, other=float("-inf"))
            if MODE == 2:
                path = a + beta
                occupancy = tl.where(path == float("-inf"), 0.0, tl.exp(path - e - ll))
                occupancy = tl.where(ll == float("-inf"), 0.0, occupancy)
                tl.store(emit_ptr + row + s, occupancy, mask=valid)
            else:
                tl.store(beta_ptr + row + s, beta, mask=valid)
            e = e_next
            a = a_next


@triton.jit
def _occupancy_kernel(emit_ptr, alpha_ptr, beta_ptr, ll_ptr, tgt_len_ptr, in_len_ptr, T, S_max,
                      BLOCK_S: tl.constexpr):
    """Row (b, t): gamma = exp(alpha + beta - emission - log p) over the emissions, 0 where no
    path passes or the sequence is infeasible."""
    row = tl.program_id(0)
    b = row // T
    t = row % T
    if t < tl.load(in_len_ptr + b):
        S = 2 * tl.load(tgt_len_ptr + b) + 1
        ll = tl.load(ll_ptr + b)
        offset = row.to(tl.int64) * S_max
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = s < S
            e = tl.load(emit_ptr + offset + s, mask=mask, other=0.0)
            path = (tl.load(alpha_ptr + offset + s, mask=mask, other=float("-inf"))
                    + tl.load(beta_ptr + offset + s, mask=mask, other=float("-inf")))
            occupancy = tl.where((path == float("-inf")) | _spread(ll == float("-inf"), s), 0.0, tl.exp(path - e - ll))
            tl.store(emit_ptr + offset + s, occupancy, mask=mask)


@triton.jit
def _segment_sum(a, a_starts, b, b_starts):
    return tl.where(b_starts, b, a + b), a_starts | b_starts


@triton.jit
def _grad_kernel(x_ptr, stride_xb, stride_xt, grad_ptr, lse_ptr, stride_lb, occ_ptr, order_ptr, sorted_ptr,
                 tgt_len_ptr, in_len_ptr, base_coef_ptr, coef_ptr, poison_ptr, T, S_max, V, rows_per_seq, t0,
                 BASE: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
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
                g = tl.exp(tl.load(x_row + c0 + cols, mask=in_row & _spread(live, cols), other=float("-inf")).to(acc) - lse) * base_coef
            g = tl.where(poisoned, float("nan"), g)
            g = tl.where(live, g, 0.0)
            tl.store(g_row + c0 + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        tl.debug_barrier()  # the row is written before its label columns are set
        tl.store(g_row + label, (at_label - coef * summed).to(grad_ptr.dtype.element_ty), mask=ends)
    else:
        current = tl.load(g_row + label, mask=ends, other=0.0).to(acc)
        tl.store(g_row + label, (current - coef * summed).to(grad_ptr.dtype.element_ty), mask=ends)


# --- host side --------------------------------------------------------------------------------

def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


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


def emissions(x: torch.Tensor, lse: torch.Tensor, ext: torch.Tensor, target_lengths: torch.Tensor,
              input_lengths: torch.Tensor, out: torch.Tensor, t0: int, lse_mode: int) -> None:
    """Fill ``out[:, t0:t0 + t]`` (B, T, S) with the state emissions of ``x`` laid out (B, t, V)
    by its strides (last stride 1); ``lse`` (B, t) is computed (1), read (2) or unused (0)."""
    B, rows, V = x.shape
    if B == 0 or rows == 0:
        return
    launch(_emissions_kernel, (B * rows,), x, x.stride(0), x.stride(1), lse, lse.stride(0), ext, target_lengths,
           input_lengths, out, out.shape[1], out.shape[2], V, rows, t0,
           LSE=lse_mode, BLOCK_V=_block(V, 2048), BLOCK_S=_block(out.shape[2], ROW_STATES))


def recursion(emit: torch.Tensor, ext: torch.Tensor, target_lengths: torch.Tensor, input_lengths: torch.Tensor,
              mode: int, alpha: Optional[torch.Tensor] = None, ll: Optional[torch.Tensor] = None):
    """Run ``_recursion_kernel``: mode 0 returns (alpha, beta, ll), mode 1 (alpha, ll), mode 2
    turns ``emit`` into occupancies given (alpha, ll)."""
    B, T, S_max = emit.shape
    block_s = _block(S_max, MAX_STATES)
    if mode in (0, 1):
        alpha = torch.empty_like(emit)
        ll = torch.empty(B, dtype=emit.dtype, device=emit.device)
    beta = torch.empty_like(emit) if mode == 0 else emit
    if B:
        launch(_recursion_kernel, (B, 2) if mode == 0 else (B,), emit, alpha, beta, ll, ext, target_lengths,
               input_lengths, T, S_max, MODE=mode, BLOCK_S=block_s, num_warps=_state_warps(block_s))
    return (alpha, beta, ll) if mode == 0 else (alpha, ll)


def occupancies(emit, alpha, beta, ll, target_lengths, input_lengths) -> None:
    B, T, S_max = emit.shape
    if B and T:
        launch(_occupancy_kernel, (B * T,), emit, alpha, beta, ll, target_lengths, input_lengths, T, S_max,
               BLOCK_S=_block(S_max, ROW_STATES))


def gradient_rows(x: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor, occ: torch.Tensor, order: torch.Tensor,
                  labels: torch.Tensor, target_lengths: torch.Tensor, input_lengths: torch.Tensor,
                  base_coef: torch.Tensor, coef: torch.Tensor, poison: torch.Tensor, t0: int, base: bool,
                  softmax: bool) -> None:
    """Launch ``_grad_kernel`` over the (B, t, V) rows of ``x``/``grad`` (same strides)."""
    B, rows, V = x.shape
    if B == 0 or rows == 0:
        return
    S_max = occ.shape[2]
    block_s = _block(S_max, MAX_STATES)
    launch(_grad_kernel, (B * rows,), x, x.stride(0), x.stride(1), grad, lse, lse.stride(0), occ, order, labels,
           target_lengths, input_lengths, base_coef, coef, poison, occ.shape[1], S_max, V, rows, t0,
           BASE=base, SOFTMAX=softmax, BLOCK_V=_block(V, 2048), BLOCK_S=block_s, num_warps=_state_warps(block_s))


def _int32(*tensors):
    return tuple(t.to(torch.int32).contiguous() for t in tensors)


def ctc_forward(inputs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                target_lengths: torch.Tensor, blank: int, from_logits: bool, want_grad: bool):
    """log p(y|x) (B,) of (T, B, C) inputs and what :func:`ctc_backward` needs: (lse, occupancies,
    sorted states) or None without ``want_grad``."""
    T, B, C = inputs.shape
    acc = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    in_len, tgt_len = _int32(input_lengths, target_lengths)
    ext = extended_labels(targets, target_lengths, blank)
    lse = torch.zeros(B, T, dtype=acc, device=inputs.device)
    emit = torch.empty(B, T, ext.shape[1], dtype=acc, device=inputs.device)
    # (T, B, C) viewed as (B, T, C) rows: stride(1) moves between sequences, stride(0) between frames
    emissions(inputs.transpose(0, 1), lse, ext, tgt_len, in_len, emit, 0, 1 if from_logits else 0)
    if not want_grad:
        _, ll = recursion(emit, ext, tgt_len, in_len, mode=1)
        return ll, None
    alpha, beta, ll = recursion(emit, ext, tgt_len, in_len, mode=0)
    occupancies(emit, alpha, beta, ll, tgt_len, in_len)
    return ll, (lse, emit) + sorted_states(ext, target_lengths)


def ctc_backward(inputs: torch.Tensor, saved, target_lengths: torch.Tensor, input_lengths: torch.Tensor,
                 coef: torch.Tensor, poison: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """The (T, B, C) gradient in the inputs' dtype: softmax * coef - coef * gamma (logits) or
    -coef * gamma (log-probs), per sequence coefficient ``coef`` (B,); NaN rows for ``poison``."""
    lse, occ, order, labels = saved
    in_len, tgt_len = _int32(input_lengths, target_lengths)
    grad = torch.empty_like(inputs, memory_format=torch.contiguous_format)
    coef = coef.to(occ.dtype).contiguous()
    gradient_rows(inputs.transpose(0, 1), grad.transpose(0, 1), lse, occ, order, labels, tgt_len, in_len, coef,
                  coef, poison.to(torch.int8).contiguous(), 0, base=True, softmax=from_logits)
    return grad
