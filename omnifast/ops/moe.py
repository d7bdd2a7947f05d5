"""Mixture-of-experts expert computation, over a :class:`Routing` (``moe_routing.py`` routes).

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

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _reference
from ._dispatch import choose_backend, moe_kernels
from ._moe_gemm import GEMM_ENGINES, _DenseMLP, _GroupedMLP, activate, activate_backward, gemm_engine
from ._precision import autocast_off, cast_all, matmul_dtype
from .checks import check_choice, check_same_device, check_tensor
from .moe_routing import Routing, route

__all__ = [
    "ACTIVATIONS",
    "Routing",
    "route",
    "permute",
    "unpermute",
    "expert_mlp",
    "routed_experts",
    "dense_experts",
    "check_expert_weights",
    "GEMM_ENGINES",
]

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")


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


def check_expert_weights(x: torch.Tensor, w1, b1, w2, b2, activation: str, x_name: str = "x") -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the argument unless ``x`` (M, H), ``w1``
    (E, F', H), ``b1`` (E, F') or None, ``w2`` (E, O, F), ``b2`` (E, O) or None fit together
    (F' = F, or 2F for swiglu) on x's device, and ``activation`` is one of ``ACTIVATIONS``."""
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor(x_name, x, floating=True)
    for name, weight in (("w1", w1), ("w2", w2)):
        check_tensor(name, weight, floating=True)
        check_same_device(name, weight, x_name, x)
        if weight.dim() != 3:
            raise ValueError(f"{name} must be (experts, out, in), got shape {tuple(weight.shape)}")
    E, F1, H = w1.shape
    width = F1 // 2 if activation == "swiglu" else F1
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"{x_name} must be (tokens, {H}) (w1's input width), got shape {tuple(x.shape)}")
    if activation == "swiglu" and F1 % 2:
        raise ValueError(f"w1 must have an even number of rows per expert for swiglu (gate, up), got {F1}")
    if w2.shape[0] != E or w2.shape[2] != width:
        raise ValueError(f"w2 must be ({E}, out, {width}) (w1's experts and hidden width), got shape {tuple(w2.shape)}")
    for name, bias, shape in (("b1", b1, (E, F1)), ("b2", b2, (E, w2.shape[1]))):
        if bias is not None:
            check_tensor(name, bias, floating=True)
            check_same_device(name, bias, x_name, x)
            if tuple(bias.shape) != shape:
                raise ValueError(f"{name} must be {shape}, got shape {tuple(bias.shape)}")


def expert_mlp(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "relu",
    backend: Optional[str] = None,
    *,
    engine: Optional[str] = None,
) -> torch.Tensor:
    """Each expert's MLP act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e] on its contiguous segment
    ``x_sorted[offsets[e]:offsets[e + 1]]``; (M, H) -> (M, O), with offsets[-1] == M. The
    matmuls run in the autocast dtype under ``torch.autocast`` (else the operands' promoted
    dtype), and so does the output. The Triton grouped GEMM takes float32 / bfloat16 / float16;
    float64 runs one matmul per segment. ``engine`` names the triton backend's GEMM engine (one
    of ``GEMM_ENGINES``; None: the fastest for the dtype and device)."""
    check_expert_weights(x_sorted, w1, b1, w2, b2, activation, x_name="x_sorted")
    check_tensor("offsets", offsets, integer=True)
    if tuple(offsets.shape) != (w1.shape[0] + 1,):
        raise ValueError(
            f"offsets must be ({w1.shape[0] + 1},) (experts + 1 segment bounds), got shape {tuple(offsets.shape)}"
        )
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
        grad_y, grad_w = moe_kernels(ctx.backend).unpermute_backward(
            grad_out, y, position, weights, ctx.top_k, ctx.needs_input_grad[1]
        )
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


def routed_experts(
    x: torch.Tensor, routing: Routing, w1, b1, w2, b2, activation: str = "relu", *, engine: Optional[str] = None
) -> torch.Tensor:
    """The top-k expert layer on routed tokens: :func:`permute`, :func:`expert_mlp` and
    :func:`unpermute` in one, (N, H) -> (N, O), differentiable w.r.t. x, the weights and the
    routing weights. With the Triton grouped GEMM the token rows are gathered inside the first
    GEMM and the outputs scattered to token-major slots by the second (no permuted copy, a
    contiguous combine); with the other GPU engines and on the CPU the three ops run as they are.
    ``engine``: as :func:`expert_mlp`."""
    check_expert_weights(x, w1, b1, w2, b2, activation)
    if routing.experts.shape[0] != x.shape[0] or routing.offsets.shape[0] != w1.shape[0] + 1:
        raise ValueError(
            f"routing is of {routing.experts.shape[0]} tokens over {routing.offsets.shape[0] - 1} "
            f"experts, but x has {x.shape[0]} tokens and w1 {w1.shape[0]} experts"
        )
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


def dense_experts(
    x: torch.Tensor, probs: torch.Tensor, w1, b1, w2, b2, activation: str = "relu", backend: Optional[str] = None
) -> torch.Tensor:
    """Every expert on every token, sum_e probs[:, e] * MLP_e(x); (N, H) -> (N, O).

    On the triton backend (a GPU): two GEMMs over all experts at once with the gate folded in
    between (``_DenseMLP``), the shape a GPU runs fastest. On the CPU one expert at a time over
    all tokens, with no masks or index ops (batched forms were slower there and larger: see
    ``docs/perf.md``); the loop keeps only one (N, F) activation per expert for the backward."""
    check_expert_weights(x, w1, b1, w2, b2, activation)
    check_tensor("probs", probs, floating=True)
    if tuple(probs.shape) != (x.shape[0], w1.shape[0]):
        raise ValueError(
            f"probs must be ({x.shape[0]}, {w1.shape[0]}) (tokens, experts), got shape {tuple(probs.shape)}"
        )
    if choose_backend(x.device, backend) == "triton":
        device = x.device.type
        x, w1, b1, w2, b2 = cast_all(matmul_dtype(device, x, w1, w2), (x, w1, b1, w2, b2))
        with autocast_off(device):
            return _DenseMLP.apply(x, probs, w1, b1, w2, b2, activation)
    out = None
    for e in range(w1.shape[0]):
        hidden = activate(F.linear(x, w1[e], None if b1 is None else b1[e]), activation)
        y = F.linear(hidden, w2[e], None if b2 is None else b2[e])
        weight = probs[:, e : e + 1].to(y.dtype)
        out = y * weight if out is None else torch.addcmul(out, y, weight)
    return out
