"""Mixture-of-experts routing: a linear gate in float32, top-k with stable tie-breaking, the
per-expert counts and the permutation that makes each expert's token slots contiguous, and the
auxiliary losses. ``torch`` routes in the reference; ``cpu`` and ``triton`` in their kernels,
with the gradient to the gate logits in closed form. The experts that consume a
:class:`Routing` are in ``moe.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _reference
from ._dispatch import choose_backend, moe_kernels
from ._precision import autocast_off
from .checks import check_int, check_same_device, check_tensor


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


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: Optional[int] = None,
    *,
    gate_bias: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: Optional[str] = None,
) -> Routing:
    """Route tokens ``x`` (N, H) with a linear gate (E, H): float32 softmax (float64 for a float64
    dense layer), top-k with stable
    tie-breaking (the lower expert index wins), optional renormalisation of the k weights, the
    per-expert counts and the permutation that sorts slots by expert, the Switch load-balancing
    loss E * sum_i f_i P_i (f_i counted over N x k slots) and the router z-loss
    mean(logsumexp(logits)^2). ``top_k=None``: dense, every expert on every token."""
    check_tensor("x", x, floating=True)
    check_tensor("gate_weight", gate_weight, floating=True)
    if x.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"x must be (N, H) and gate_weight (E, H) with the same H, got {tuple(x.shape)} "
            f"and {tuple(gate_weight.shape)}"
        )
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
