"""Triton building blocks of fused linear-CTC (the matmuls stay in torch): the log-sum-exp and
state-emission gather of a chunk of logits, the CTC recursion on given emissions (the kernels
of ``ctc.py`` in their GATHER=False / OCCUPANCY_OUT modes), and the gradient formation
softmax * coef - occupancy * coef_k written over the chunk. Contracts: the functions of the same
names in ``omnifast/ops/_reference.py``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ctc import _block, _ctc_alpha_kernel, _ctc_beta_grad_kernel


@triton.jit
def _chunk_emissions_kernel(logits_ptr, lse_ptr, in_len_ptr, ext_ptr, tgt_len_ptr, emit_ptr,
                            ct, V, T, S_max, t0, LSE_GIVEN: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    b = row // ct
    t = t0 + row % ct
    if t < tl.load(in_len_ptr + b):
        x_row = logits_ptr + row.to(tl.int64) * V
        if LSE_GIVEN:
            lse = tl.load(lse_ptr + row)
        else:
            cols = tl.arange(0, BLOCK_V)
            m = tl.full([BLOCK_V], float("-inf"), tl.float32).to(lse_ptr.dtype.element_ty)
            for c0 in range(0, V, BLOCK_V):
                m = tl.maximum(m, tl.load(x_row + c0 + cols, mask=c0 + cols < V, other=float("-inf")))
            top = tl.max(m, 0)
            top = tl.where(top > float("-inf"), top, 0.0)
            total = tl.zeros([BLOCK_V], tl.float32).to(lse_ptr.dtype.element_ty)
            for c0 in range(0, V, BLOCK_V):
                total += tl.exp(tl.load(x_row + c0 + cols, mask=c0 + cols < V, other=float("-inf")) - top)
            lse = top + tl.log(tl.sum(total, 0))
            tl.store(lse_ptr + row, lse)
        S = 2 * tl.load(tgt_len_ptr + b) + 1
        out = emit_ptr + (b.to(tl.int64) * T + t) * S_max
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            label = tl.load(ext_ptr + b * S_max + s, mask=s < S, other=0)
            tl.store(out + s, tl.load(x_row + label, mask=s < S, other=0.0) - lse, mask=s < S)


@triton.jit
def _chunk_softmax_kernel(logits_ptr, lse_ptr, in_len_ptr, coef_ptr, poison_ptr, ct, V, t0,
                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    b = row // ct
    t = t0 + row % ct
    live = t < tl.load(in_len_ptr + b)
    poisoned = tl.load(poison_ptr + b) != 0
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + b)
    x_row = logits_ptr + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    for c0 in range(0, V, BLOCK_V):
        mask = c0 + cols < V
        g = tl.exp(tl.load(x_row + c0 + cols, mask=mask, other=0.0) - lse) * coef
        g = tl.where(poisoned, float("nan"), g)
        tl.store(x_row + c0 + cols, tl.where(live, g, 0.0), mask=mask)


@triton.jit
def _chunk_scatter_kernel(grad_ptr, in_len_ptr, poison_ptr, ext_ptr, tgt_len_ptr, occ_ptr, coef_ptr,
                          ct, V, T, S_max, t0, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    b = row // ct
    t = t0 + row % ct
    if (t < tl.load(in_len_ptr + b)) & (tl.load(poison_ptr + b) == 0):
        S = 2 * tl.load(tgt_len_ptr + b) + 1
        coef = tl.load(coef_ptr + b)
        occ_row = occ_ptr + (b.to(tl.int64) * T + t) * S_max
        g_row = grad_ptr + row.to(tl.int64) * V
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            label = tl.load(ext_ptr + b * S_max + s, mask=s < S, other=0)
            occupancy = tl.load(occ_row + s, mask=s < S, other=0.0)
            tl.atomic_add(g_row + label, -coef * occupancy, mask=s < S)


def chunk_emissions(logits, t0, input_lengths, exts, target_lengths, emissions):
    B, ct, V = logits.shape
    lse = torch.zeros(B, ct, dtype=logits.dtype, device=logits.device)
    in_len = input_lengths.to(torch.int32).contiguous()
    for k, (ext, lengths, out) in enumerate(zip(exts, target_lengths, emissions)):
        _chunk_emissions_kernel[(B * ct,)](
            logits, lse, in_len, ext.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous(), out,
            ct, V, out.shape[1], out.shape[2], t0, LSE_GIVEN=k > 0,
            BLOCK_V=_block(V, 2048), BLOCK_S=_block(out.shape[2], 1024))
    return lse


def ctc_states(emissions, targets, input_lengths, target_lengths, blank, want_occupancy):
    B, T, S_max = emissions.shape
    block_s = _block(S_max, 1024)
    warps = 4 if block_s <= 256 else 8
    targets = targets.to(torch.int32).contiguous()
    in_len = input_lengths.to(torch.int32).contiguous()
    tgt_len = target_lengths.to(torch.int32).contiguous()
    alpha = torch.empty_like(emissions)
    ll = torch.empty(B, dtype=emissions.dtype, device=emissions.device)
    _ctc_alpha_kernel[(B,)](emissions, ll, targets, in_len, tgt_len, emissions, alpha, ll,
                            T, B, 1, targets.shape[1], S_max, blank,
                            FROM_LOGITS=False, BLOCK_S=block_s, GATHER=False, num_warps=warps)
    if want_occupancy:
        beta = torch.empty(B, 2, S_max, dtype=emissions.dtype, device=emissions.device)
        _ctc_beta_grad_kernel[(B,)](targets, in_len, tgt_len, emissions, alpha, beta, ll, ll, emissions,
                                    T, B, 1, targets.shape[1], S_max, blank, BLOCK_S=block_s,
                                    OCCUPANCY_OUT=True, num_warps=warps)
    return ll


def chunk_grad(logits, lse, t0, input_lengths, softmax_coef, exts, target_lengths, occupancies, coefs, poison):
    B, ct, V = logits.shape
    in_len = input_lengths.to(torch.int32).contiguous()
    poison = poison.to(torch.int8).contiguous()
    _chunk_softmax_kernel[(B * ct,)](logits, lse.contiguous(), in_len, softmax_coef.contiguous(), poison,
                                     ct, V, t0, BLOCK_V=_block(V, 2048))
    for ext, lengths, occ, coef in zip(exts, target_lengths, occupancies, coefs):
        _chunk_scatter_kernel[(B * ct,)](logits, in_len, poison, ext.to(torch.int32).contiguous(),
                                         lengths.to(torch.int32).contiguous(), occ, coef.contiguous(),
                                         ct, V, occ.shape[1], occ.shape[2], t0, BLOCK_S=_block(occ.shape[2], 1024))
