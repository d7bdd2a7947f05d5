"""Mixture-of-experts routing and expert computation.

Parameters are stacked per expert in ``nn.Linear``'s (out, in) convention: ``w1`` (E, F', H)
with F' = F (or 2F for swiglu: gate rows first, then up rows), ``b1`` (E, F'), ``w2`` (E, O, F),
``b2`` (E, O).

Sparse (top-k, dropless) flow: :func:`route` -> :func:`routed_experts`, which is :func:`permute`
the token slots so each expert's are contiguous -> :func:`expert_mlp` over the segments ->
:func:`unpermute` (weighted combine by gather, deterministic). Dense flow (every expert on every
token, OpenOmni): :func:`dense_experts`.

Backends (``backend=`` / ``OMNIFAST_BACKEND``, as for every op): ``torch`` is the readable
reference, autograd throughout. ``cpu`` runs routing (softmax, top-k, counting sort) and the
combine in C++ kernels and the expert matmuls one per segment. ``triton`` (a GPU) routes and
sorts in Triton kernels and runs the expert GEMMs on the engine that is fastest for the dtype
and device (``_moe_gemm.py``: ``torch._grouped_mm`` on sm_90 bf16, the Triton grouped GEMM with
the permutation fused into its loads and stores, or cuBLAS per segment for float32), without
reading anything back to the host except for float32's segment bounds; dense layers run as two
GEMMs over all experts. The gate's own matmul stays ``F.linear`` in float32 on every backend, and
the routing gradient is a closed form over the (N, E) probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .checks import check_choice, check_int, check_same_device, check_tensor
from . import _reference
from ._dispatch import choose_backend, moe_kernels
from ._moe_gemm import GEMM_ENGINES, _DenseMLP, _GroupedMLP, activate, activate_backward, gemm_engine
from ._precision import autocast_off, cast_all, matmul_dtype

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")


@dataclass
class Routing:
    """The routing of N tokens over E experts with k slots per token (k = E when dense).

    probs (N, E) float32 softmax of the gate; weights (N, k) float32 combine weights (carry the
    gradient to the gate); experts (N, k) int64; counts (E,) slots per expert; offsets (E + 1,)
    segment starts in expert order; order (N * k,) slot ids (n * k + j) sorted by expert, stable;
    position (N * k,) the inverse: where each slot landed; balance_loss and z_loss float32;
    backend: where the permute / combine of this routing run."""
    probs: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    backend: str = "torch"

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]


class _Route(torch.autograd.Function):
    """Kernel routing; the gradient to the logits in closed form from probs, weights, experts."""

    @staticmethod
    def forward(ctx, logits, top_k, normalize, backend):
        probs, weights, experts, lse, *index = moe_kernels(backend).route(logits, top_k, normalize)
        ctx.save_for_backward(probs, weights, experts)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(experts, *index)
        return (probs, weights, lse, experts, *index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs, grad_weights, grad_lse, *_):
        probs, weights, experts = ctx.saved_tensors
        grad_p = torch.zeros_like(probs) if grad_probs is None else grad_probs.float().clone()
        if grad_weights is not None:
            grad_w = grad_weights.float()
            if ctx.normalize:  # w_j = p_j / s: dL/dp_j = (g_j - sum_i g_i w_i) / s
                chosen = probs.gather(1, experts).sum(-1, keepdim=True)
                grad_w = (grad_w - (grad_w * weights).sum(-1, keepdim=True)) / chosen
            grad_p.scatter_add_(1, experts, grad_w)
        grad_logits = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))
        if grad_lse is not None:
            grad_logits += grad_lse.float()[:, None] * probs
        return grad_logits, None, None, None


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: Optional[int] = None, *,
          gate_bias: Optional[torch.Tensor] = None, normalize: bool = True,
          backend: Optional[str] = None) -> Routing:
    """Route tokens ``x`` (N, H) with a linear gate (E, H): float32 softmax (float64 for a float64
    dense layer), top-k with stable
    tie-breaking (the lower expert index wins), optional renormalisation of the k weights, the
    per-expert counts and the permutation that sorts slots by expert, the Switch load-balancing
    loss E * sum_i f_i P_i (f_i counted over N x k slots) and the router z-loss
    mean(logsumexp(logits)^2). ``top_k=None``: dense, every expert on every token."""
    check_tensor("x", x, floating=True)
    check_tensor("gate_weight", gate_weight, floating=True)
    if x.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (N, H) and gate_weight (E, H) with the same H, got {tuple(x.shape)} "
                         f"and {tuple(gate_weight.shape)}")
    E, N = gate_weight.shape[0], x.shape[0]
    check_same_device("gate_weight", gate_weight, "x", x)
    if gate_bias is not None:
        check_tensor("gate_bias", gate_bias, floating=True)
        check_same_device("gate_bias", gate_bias, "x", x)
        if tuple(gate_bias.shape) != (E,):
            raise ValueError(f"gate_bias must be ({E},), one value per expert, got shape {tuple(gate_bias.shape)}")
    if top_k is not None:
        check_int("top_k", top_k)
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be None (dense) or in [1, {E}] (the number of experts), got {top_k}")
    backend = choose_backend(x.device, backend)
    # the router runs in float32 whatever autocast says (float64 inputs stay float64: dense only,
    # which has no kernel of its own)
    acc = torch.float64 if x.dtype == torch.float64 and top_k is None else torch.float32
    with autocast_off(x.device.type):
        logits = F.linear(x.to(acc), gate_weight.to(acc), None if gate_bias is None else gate_bias.to(acc))
    if top_k is None:
        probs, lse = torch.softmax(logits, -1), torch.logsumexp(logits, -1)
        experts = torch.arange(E, device=x.device).expand(N, E)
        counts = torch.full((E,), N, dtype=torch.int64, device=x.device)
        offsets = torch.arange(E + 1, device=x.device) * N
        slots = torch.arange(N * E, device=x.device)
        order = slots.view(N, E).t().reshape(-1)
        position = slots.view(E, N).t().reshape(-1)
        weights = probs
    elif backend == "torch":
        probs, weights, experts, lse, counts, offsets, order, position = _reference.moe_route(logits, top_k, normalize)
    else:
        probs, weights, lse, experts, counts, offsets, order, position = _Route.apply(logits, top_k, normalize, backend)
    k = experts.shape[1]
    fraction = counts.float() / max(N * k, 1)
    balance = E * (fraction * probs.mean(0)).sum() if N else logits.new_zeros(())
    z_loss = lse.pow(2).mean() if N else logits.new_zeros(())
    return Routing(probs, weights, experts, counts, offsets, order, position, balance, z_loss, backend)


class _ExpertMLP(torch.autograd.Function):
    """Grouped MLP over contiguous expert segments: one matmul per non-empty segment, into
    preallocated buffers, no masks. For relu only the activation is saved (its sign gives the
    backward); for the others only the pre-activation, and the activation is recomputed."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, segments, activation):
        M = x.shape[0]
        pre = x.new_empty(M, w1.shape[1])
        out = x.new_empty(M, w2.shape[1])
        for e, start, end in segments:
            pre_e = torch.mm(x[start:end], w1[e].t(), out=pre[start:end])
            if b1 is not None:
                pre_e += b1[e]
            if activation == "relu":
                hidden_e = pre_e.clamp_min_(0)
            else:
                hidden_e = activate(pre_e, activation)
            torch.mm(hidden_e, w2[e].t(), out=out[start:end])
            if b2 is not None:
                out[start:end] += b2[e]
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.segments, ctx.activation, ctx.has_bias = segments, activation, (b1 is not None, b2 is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w1, w2, saved = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        grad_b1 = x.new_empty(w1.shape[:2]) if ctx.has_bias[0] else None
        grad_b2 = x.new_empty(w2.shape[:2]) if ctx.has_bias[1] else None
        busy = {e for e, _, _ in ctx.segments}
        idle = [e for e in range(w1.shape[0]) if e not in busy]
        for grad in (grad_w1, grad_w2, grad_b1, grad_b2):  # experts without tokens get zeros
            if grad is not None:
                grad[idle] = 0
        grad_out = grad_out.contiguous()
        for e, start, end in ctx.segments:
            g = grad_out[start:end]
            if ctx.activation == "relu":
                hidden = saved[start:end]
            else:
                hidden = activate(saved[start:end], ctx.activation)
            torch.mm(hidden.t(), g, out=grad_w2[e].t())
            if grad_b2 is not None:
                grad_b2[e] = g.sum(0)
            g_hidden = g @ w2[e]
            if ctx.activation == "relu":
                g_pre = g_hidden.masked_fill_(hidden <= 0, 0)
            else:
                g_pre = activate_backward(g_hidden, saved[start:end], ctx.activation)
            torch.mm(x[start:end].t(), g_pre, out=grad_w1[e].t())
            if grad_b1 is not None:
                grad_b1[e] = g_pre.sum(0)
            torch.mm(g_pre, w1[e], out=grad_x[start:end])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def expert_mlp(x_sorted: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
               w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str = "relu",
               backend: Optional[str] = None, *, engine: Optional[str] = None) -> torch.Tensor:
    """Each expert's MLP act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e] on its contiguous segment
    ``x_sorted[offsets[e]:offsets[e + 1]]``; (M, H) -> (M, O), with offsets[-1] == M. The
    matmuls run in the autocast dtype under ``torch.autocast`` (else the operands' promoted
    dtype), and so does the output. The Triton grouped GEMM takes float32 / bfloat16 / float16;
    float64 runs one matmul per segment. ``engine`` names the triton backend's GEMM engine (one
    of ``GEMM_ENGINES``; None: the fastest for the dtype and device)."""
    if engine is not None:
        check_choice("engine", engine, GEMM_ENGINES)
    device = x_sorted.device.type
    x_sorted, w1, b1, w2, b2 = cast_all(matmul_dtype(device, x_sorted, w1, w2), (x_sorted, w1, b1, w2, b2))
    with autocast_off(device):
        if choose_backend(x_sorted.device, backend) == "triton":
            chosen = gemm_engine(x_sorted, w1, w2, offsets, engine)
            return _GroupedMLP.apply(x_sorted, w1, b1, w2, b2, offsets, None, 1, activation, chosen)
        bounds = offsets.tolist()
        segments = [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]
        return _ExpertMLP.apply(x_sorted, w1, b1, w2, b2, segments, activation)


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, position, top_k, backend):
        ctx.save_for_backward(y, weights, position)
        ctx.top_k, ctx.backend = top_k, backend
        return moe_kernels(backend).unpermute(y, position, weights, top_k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, weights, position = ctx.saved_tensors
        grad_y, grad_w = moe_kernels(ctx.backend).unpermute_backward(grad_out, y, position, weights, ctx.top_k,
                                                                     ctx.needs_input_grad[1])
        return grad_y, grad_w, None, None, None


class _Permute(torch.autograd.Function):
    """Gather token rows into slot order; the backward sums each token's k slot gradients by
    gather (the combine with unit weights), so it needs no atomics either."""

    @staticmethod
    def forward(ctx, x, order, position, top_k, backend):
        ctx.save_for_backward(position)
        ctx.top_k, ctx.backend = top_k, backend
        return x.index_select(0, order // top_k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sorted):
        (position,) = ctx.saved_tensors
        unpermute = moe_kernels(ctx.backend).unpermute
        return unpermute(grad_sorted.contiguous(), position, None, ctx.top_k), None, None, None, None


def permute(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token rows in expert order, one per slot: (N, H) -> (N * k, H)."""
    if routing.backend == "torch":
        return x[routing.order // routing.top_k]
    return _Permute.apply(x, routing.order, routing.position, routing.top_k, routing.backend)


def unpermute(y_sorted: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Weighted combine of each token's k expert outputs, by gather (no atomics, deterministic):
    (N * k, O) -> (N, O), differentiable w.r.t. the outputs and the routing weights (float32)."""
    N, k = routing.experts.shape
    if routing.backend == "torch":
        return _reference.moe_unpermute(y_sorted, routing.position, routing.weights, k)
    return _Unpermute.apply(y_sorted, routing.weights.contiguous(), routing.position, k, routing.backend)


def routed_experts(x: torch.Tensor, routing: Routing, w1, b1, w2, b2, activation: str = "relu", *,
                   engine: Optional[str] = None) -> torch.Tensor:
    """The top-k expert layer on routed tokens: :func:`permute`, :func:`expert_mlp` and
    :func:`unpermute` in one, (N, H) -> (N, O), differentiable w.r.t. x, the weights and the
    routing weights. With the Triton grouped GEMM the token rows are gathered inside the first
    GEMM and the outputs scattered to token-major slots by the second (no permuted copy, a
    contiguous combine); with the other GPU engines and on the CPU the three ops run as they are.
    ``engine``: as :func:`expert_mlp`."""
    if engine is not None:
        check_choice("engine", engine, GEMM_ENGINES)
    if routing.backend != "triton":
        y = expert_mlp(permute(x, routing), routing.offsets, w1, b1, w2, b2, activation, backend=routing.backend)
        return unpermute(y, routing)
    device = x.device.type
    x, w1, b1, w2, b2 = cast_all(matmul_dtype(device, x, w1, w2), (x, w1, b1, w2, b2))
    N, k = routing.experts.shape
    with autocast_off(device):
        chosen = gemm_engine(x, w1, w2, routing.offsets, engine)
        if not chosen.fuses_gathers:  # see _moe_gemm: gather once, combine by gather
            y = _GroupedMLP.apply(permute(x, routing), w1, b1, w2, b2, routing.offsets, None, 1, activation, chosen)
            return unpermute(y, routing)
        y_slots = _GroupedMLP.apply(x, w1, b1, w2, b2, routing.offsets, routing.order, k, activation, chosen)
        identity = torch.arange(N * k, device=x.device)  # the slots are already in token-major order
        return _Unpermute.apply(y_slots, routing.weights.contiguous(), identity, k, "triton")


def dense_experts(x: torch.Tensor, probs: torch.Tensor, w1, b1, w2, b2, activation: str = "relu",
                  backend: Optional[str] = None) -> torch.Tensor:
    """Every expert on every token, sum_e probs[:, e] * MLP_e(x); (N, H) -> (N, O).

    On the triton backend (a GPU): two GEMMs over all experts at once with the gate folded in
    between (``_DenseMLP``), the shape a GPU runs fastest. On the CPU one expert at a time over
    all tokens, with no masks or index ops: batched forms were measured there and were not
    faster (a (E, N, F) batched matmul ran at 0.82x NaiveMoE's speed with 1.4x the memory, two
    stacked GEMMs at 0.80x with 1.9x the memory, 16384 tokens). The loop keeps only one (N, F)
    activation per expert for the backward."""
    if choose_backend(x.device, backend) == "triton":
        device = x.device.type
        x, w1, b1, w2, b2 = cast_all(matmul_dtype(device, x, w1, w2), (x, w1, b1, w2, b2))
        with autocast_off(device):
            return _DenseMLP.apply(x, probs, w1, b1, w2, b2, activation)
    out = None
    for e in range(w1.shape[0]):
        hidden = activate(F.linear(x, w1[e], None if b1 is None else b1[e]), activation)
        y = F.linear(hidden, w2[e], None if b2 is None else b2[e])
        weight = probs[:, e:e + 1].to(y.dtype)
        out = y * weight if out is None else torch.addcmul(out, y, weight)
    return out
