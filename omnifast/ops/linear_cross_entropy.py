"""Fused linear + cross-entropy over row chunks: the (N, V) logits are never held whole.

Each chunk's logits are formed, reduced to the loss and turned into their gradient
(softmax - one_hot) at once, in float32; the gradients of the hidden states, the weight and the
bias are accumulated during the forward (as Liger-Kernel's fused linear cross-entropy does), so
the backward only scales them. The matmuls are torch's on every device, which is where the time
goes, so this op has one implementation rather than three backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._ctc_engine import CHUNK_ELEMENTS
from ._precision import accumulation_dtype
from .checks import check_choice, check_int, check_linear_head, check_tensor


class _LinearCrossEntropyRows(torch.autograd.Function):
    """``reduction="none"``: the loss of every row; the gradient, which needs each row's upstream
    gradient, is formed in the backward from recomputed chunks of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_rows):
        valid = targets != ignore_index
        acc = accumulation_dtype(hidden.dtype)
        losses = hidden.new_zeros(hidden.shape[0], dtype=acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = F.linear(hidden[rows], weight, bias).to(acc)
            target = targets[rows].clamp(min=0)[:, None]
            losses[rows] = (torch.logsumexp(logits, -1) - logits.gather(1, target).squeeze(1)) * valid[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, valid)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, valid = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        acc = accumulation_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, target = hidden[rows], targets[rows].clamp(min=0)[:, None]
            grad = torch.softmax(F.linear(h, weight, bias).to(acc), -1)
            grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))
            grad.mul_((grad_losses[rows].to(acc) * valid[rows])[:, None])
            if grad_hidden is not None:
                grad_hidden[rows] = (grad.to(h.dtype) @ weight).to(h.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, chunk_rows):
        valid = targets != ignore_index
        count = valid.sum()
        scale = 1.0 / count.clamp(min=1).item() if reduction == "mean" else 1.0
        needs = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        acc = accumulation_dtype(hidden.dtype)
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            keep = valid[start : start + chunk_rows]
            target = targets[start : start + chunk_rows].clamp(min=0)[:, None]
            logits = F.linear(h, weight, bias).to(acc)
            lse = torch.logsumexp(logits, -1, keepdim=True)
            total += ((lse - logits.gather(1, target)).squeeze(1) * keep).sum()
            if any(needs):
                grad = logits.sub_(lse).exp_()
                grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))
                grad.mul_(keep[:, None].to(acc) * scale)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = grad.to(h.dtype) @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t(), h.to(acc))
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = []
        for present, dtype in zip(ctx.present, ctx.dtypes):
            grads.append((next(saved) * grad_loss).to(dtype) if present else None)
        return (*grads, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=..., reduction=...)``
    for ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,), computed ``chunk_rows`` rows at a
    time (default: about 4M logits per chunk). reduction: "mean" (over non-ignored rows), "sum",
    or "none" (each row's loss, 0 for ignored rows; its gradient recomputes the logits in the
    backward). Float32 accumulation (float64 for float64 inputs); the loss is float32 (float64)."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("targets", targets, integer=True)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or hidden.shape[0] == 0:
        raise ValueError(
            f"hidden must be (N, D) with N >= 1 and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    check_linear_head(hidden.unsqueeze(0), weight, bias)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_int("ignore_index", ignore_index)
    V = weight.shape[0]
    real = targets[targets != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
        raise ValueError(
            f"targets must be in [0, {V}) or ignore_index={ignore_index}, "
            f"got values in [{int(real.min())}, {int(real.max())}]"
        )
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if reduction == "none":
        return _LinearCrossEntropyRows.apply(hidden, weight, bias, targets, ignore_index, chunk_rows)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, reduction, chunk_rows)
