"""The expert MLP of a routed MoE on a GPU: one autograd algebra over three GEMM engines.

``_GroupedMLP`` computes act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e] for the rows of each expert
segment, forward and backward. On an engine that takes row indices it also gathers the token rows
on the way in and scatters the outputs to token-major slot order on the way out (ScatterMoE's
layout), so a routed layer needs no permuted copy of its tokens and its combine reads contiguous
rows. The engines differ only in how a grouped GEMM runs:

* ``TritonEngine``: omnifast's Triton grouped GEMM, gathers and scatters fused into its loads and
  stores, segment bounds read on the device.
* ``GroupedMMEngine``: ``torch._grouped_mm`` (CUTLASS, sm_90+, bf16, no host sync) on rows in
  expert order, biases a Triton pass.
* ``SegmentsEngine``: one cuBLAS matmul per segment, the bounds read back once per layer; what
  float32 uses, as fast as the naive loop's own GEMMs.

On the last two a routed layer gathers its tokens into expert order once (kept for the weight
gradient, as the naive loop keeps its per-expert copies) and combines by gather; the backward then
reads the upstream gradient in expert order from the combine's own backward and sums each token's
slot gradients by gather. Each pass over the slot rows happens once; figures: ``docs/perf.md``.

``gemm_engine`` picks one. ``_DenseMLP`` is the dense (OpenOmni) layer as two GEMMs over all
experts at once, the gate weights folded in between.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._dispatch import moe_kernels

GEMM_ENGINES = ("triton", "grouped_mm", "segments")


def activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert MLP's activation by name (``ACTIVATIONS``); swiglu halves the width."""
    if activation == "swiglu":
        gate, up = pre.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](pre)


def activate_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    with torch.enable_grad():
        leaf = pre.detach().requires_grad_()
        (result,) = torch.autograd.grad(activate(leaf, activation), leaf, grad)
    return result


class TritonEngine:
    name = "triton"
    fuses_gathers = True  # takes row indices: a routed layer's gathers and scatters ride in its loads and stores

    def __init__(self):
        self.kernels = moe_kernels("triton")

    def mm(self, a, w, b, offsets, transpose=True, a_rows=None, c_rows=None, out_rows=None):
        return self.kernels.grouped_mm(a, w, b, offsets, transpose, a_rows, c_rows, out_rows)

    def wgrad(self, g, x, offsets, experts, bias_grad, g_rows=None, x_rows=None):
        return self.kernels.grouped_weight_grad(g, x, offsets, experts, bias_grad, g_rows, x_rows)


class _PlainGEMMs:
    """An engine whose grouped GEMM takes no row indices: rows arrive in expert order. A routed
    layer on it gathers its tokens once before the MLP and combines by gather after it
    (``ops.moe.routed_experts``): that moves less than gathering inside each of its GEMMs would
    (the first GEMM, and the upstream gradient and the tokens again in the backward) and the
    scatter-then-combine."""

    fuses_gathers = False

    def mm(self, a, w, b, offsets, transpose=True, a_rows=None, c_rows=None, out_rows=None):
        assert a_rows is None and c_rows is None, "this engine takes rows in expert order"
        return self._mm(a.contiguous(), w.transpose(1, 2) if transpose else w, b, offsets)

    def wgrad(self, g, x, offsets, experts, bias_grad, g_rows=None, x_rows=None):
        assert g_rows is None and x_rows is None, "this engine takes rows in expert order"
        return self._wgrad(g.contiguous(), x.contiguous(), offsets, experts, bias_grad)


class GroupedMMEngine(_PlainGEMMs):
    name = "grouped_mm"

    def __init__(self):
        self.kernels = moe_kernels("triton")

    def _mm(self, a, w, b, offsets):  # a (M, K), w (E, K, N)
        y = torch._grouped_mm(a, w, offs=offsets[1:].to(torch.int32))
        return y if b is None else self.kernels.add_segment_bias(y, b, offsets)

    def _wgrad(self, g, x, offsets, experts, bias_grad):
        grad_w = torch._grouped_mm(g.t(), x, offs=offsets[1:].to(torch.int32))  # (E, N, K)
        busy = (offsets[1:] > offsets[:-1])[:, None, None]
        grad_w = torch.where(busy, grad_w, 0)  # an expert with no rows gets zeros, whatever the kernel left
        grad_b = self.kernels.segment_sum(g, offsets, g.dtype) if bias_grad else None
        return grad_w, grad_b


class SegmentsEngine(_PlainGEMMs):
    """One matmul per non-empty segment; the bounds are read back once, when the engine is made."""

    name = "segments"

    def __init__(self, offsets: torch.Tensor):
        bounds = offsets.tolist()
        self.segments = [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]

    def _mm(self, a, w, b, offsets):  # a (M, K), w (E, K, N)
        y = a.new_empty(a.shape[0], w.shape[2])
        for e, start, end in self.segments:
            if b is None:
                torch.mm(a[start:end], w[e], out=y[start:end])
            else:
                torch.addmm(b[e], a[start:end], w[e], out=y[start:end])
        return y

    def _wgrad(self, g, x, offsets, experts, bias_grad):
        grad_w = g.new_zeros(experts, g.shape[1], x.shape[1])
        grad_b = g.new_zeros(experts, g.shape[1]) if bias_grad else None
        for e, start, end in self.segments:
            torch.mm(g[start:end].t(), x[start:end], out=grad_w[e])
            if grad_b is not None:
                grad_b[e] = g[start:end].sum(0, dtype=torch.float32)
        return grad_w, grad_b


def _grouped_mm_fits(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """torch._grouped_mm's fast path: CUDA sm_90+, bf16, every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return all(size % 8 == 0 for size in (w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2]))


def gemm_engine(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, choice: Optional[str] = None
):
    """The engine for the triton backend, the one named by ``choice`` (one of ``GEMM_ENGINES``) or
    by default: torch._grouped_mm where its fast path applies, one cuBLAS matmul per segment for
    float32/float64 (Triton's float32 dot runs at a fraction of cuBLAS' speed, ``docs/perf.md``),
    and the Triton grouped GEMM otherwise (half precision elsewhere, and under the interpreter)."""
    if choice is None:
        if _grouped_mm_fits(x, w1, w2):
            choice = "grouped_mm"
        elif x.dtype == torch.float64 or (x.dtype == torch.float32 and x.device.type == "cuda"):
            choice = "segments"
        else:
            choice = "triton"
    if choice == "grouped_mm":
        return GroupedMMEngine()
    if choice == "segments":
        return SegmentsEngine(offsets)
    return TritonEngine()


class _GroupedMLP(torch.autograd.Function):
    """The expert MLP over segments (``offsets``). ``slots`` None: the rows of ``x`` are already
    in expert order and so are the outputs. ``slots`` (M,): sorted row m is token slot slots[m]
    = token * top_k + j, so it reads x[slots[m] // top_k] and its output lands at row slots[m]
    (token-major, (N * top_k, O)). For relu only the activation is saved (its sign gives the
    backward); for the others the pre-activation, and the activation is recomputed."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, offsets, slots, top_k, activation, engine):
        tokens = None if slots is None else slots // top_k
        pre = engine.mm(x, w1, b1, offsets, a_rows=tokens)
        act = activate(pre, activation)
        y = engine.mm(act, w2, b2, offsets, c_rows=slots, out_rows=None if slots is None else slots.numel())
        ctx.save_for_backward(
            x, w1, w2, act if activation == "relu" else pre, offsets, *(() if slots is None else (slots, tokens))
        )
        ctx.activation, ctx.engine, ctx.top_k = activation, engine, top_k
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w1, w2, saved, offsets, *routed = ctx.saved_tensors
        slots, tokens = routed if routed else (None, None)
        engine, E = ctx.engine, w1.shape[0]
        grad_y = grad_y.contiguous()
        act = saved if ctx.activation == "relu" else activate(saved, ctx.activation)
        grad_w2, grad_b2 = engine.wgrad(grad_y, act, offsets, E, ctx.has_bias[1], g_rows=slots)
        grad_act = engine.mm(grad_y, w2, None, offsets, transpose=False, a_rows=slots)
        if ctx.activation == "relu":
            grad_pre = grad_act.masked_fill_(act <= 0, 0)
        else:
            del act
            grad_pre = activate_backward(grad_act, saved, ctx.activation)
        grad_w1, grad_b1 = engine.wgrad(grad_pre, x, offsets, E, ctx.has_bias[0], x_rows=tokens)
        grad_x = engine.mm(
            grad_pre,
            w1,
            None,
            offsets,
            transpose=False,
            c_rows=slots,
            out_rows=None if slots is None else slots.numel(),
        )
        if slots is not None:  # each token's k slot gradients, summed in a fixed order
            grad_x = grad_x.view(-1, ctx.top_k, grad_x.shape[1]).sum(1, dtype=torch.float32).to(x.dtype)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (
            grad_x,
            cast(grad_w1, w1),
            grad_b1 if grad_b1 is None else grad_b1.to(w1.dtype),
            cast(grad_w2, w2),
            grad_b2 if grad_b2 is None else grad_b2.to(w2.dtype),
            None,
            None,
            None,
            None,
            None,
        )


class _DenseMLP(torch.autograd.Function):
    """Every expert on every token as two GEMMs over all experts at once: x @ [w1_0; ...; w1_E].T,
    the activation, each expert's block scaled by its gate probability, then one GEMM with the
    experts' w2 side by side (K = E * F). The backward is four GEMMs of the same size; the gate
    gradient is each block's <activation, upstream> plus <upstream, b2[e]>."""

    @staticmethod
    def forward(ctx, x, probs, w1, b1, w2, b2, activation):
        N, (E, width, H), O = x.shape[0], w1.shape, w2.shape[1]
        pre = F.linear(x, w1.reshape(E * width, H), None if b1 is None else b1.reshape(-1)).view(N, E, width)
        act = activate(pre, activation)
        gate = probs.to(act.dtype)[:, :, None]
        w2_all = w2.permute(1, 0, 2).reshape(O, -1)  # (O, E * F)
        y = F.linear((act * gate).reshape(N, E * act.shape[-1]), w2_all)
        if b2 is not None:
            y += probs.to(y.dtype) @ b2
        ctx.save_for_backward(x, probs, w1, w2, b2, act if activation == "relu" else pre)
        ctx.activation, ctx.has_b1 = activation, b1 is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, probs, w1, w2, b2, saved = ctx.saved_tensors
        N, (E, width, H), (O, F_) = x.shape[0], w1.shape, w2.shape[1:]
        act = saved if ctx.activation == "relu" else activate(saved, ctx.activation)
        gate = probs.to(act.dtype)[:, :, None]
        w2_all = w2.permute(1, 0, 2).reshape(O, -1)
        grad_scaled = (grad_y @ w2_all).view(N, E, F_)
        grad_probs = (act.float() * grad_scaled.float()).sum(-1)
        grad_w2 = (grad_y.t() @ (act * gate).reshape(N, E * F_)).view(O, E, F_).permute(1, 0, 2).contiguous()
        grad_b2 = None
        if b2 is not None:
            grad_probs += grad_y.float() @ b2.float().t()
            grad_b2 = (probs.to(grad_y.dtype).t() @ grad_y).to(b2.dtype)
        grad_act = grad_scaled.mul_(gate)
        if ctx.activation == "relu":
            grad_pre = grad_act.masked_fill_(act <= 0, 0)
        else:
            del act
            grad_pre = activate_backward(grad_act, saved, ctx.activation)
        grad_pre = grad_pre.reshape(N, E * width)
        grad_w1 = (grad_pre.t() @ x).view(E, width, H)
        grad_b1 = grad_pre.sum(0, dtype=torch.float32).view(E, width).to(w1.dtype) if ctx.has_b1 else None
        grad_x = grad_pre @ w1.reshape(E * width, H)
        return grad_x, grad_probs.to(probs.dtype), grad_w1, grad_b1, grad_w2.to(w2.dtype), grad_b2, None
