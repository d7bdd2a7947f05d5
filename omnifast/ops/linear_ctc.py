"""Fused linear + CTC: the loss of ``ctc_loss(log_softmax(hidden @ weight.T + bias))`` without
ever holding the (B, T, V) logits.

Pass 1 computes each chunk's logits, their log-sum-exp and the emissions of the 2L+1 label
states; the alpha/beta recursion then runs on (B, T, 2L+1) only and leaves the state
occupancies gamma in place of the emissions. The gradient of a row of logits is
coef * (softmax - gamma summed at the row's labels), and the coefficients of the mean and sum
reductions are known before the recursion, so for them pass 1 also turns each chunk into
coef * softmax and runs its two gradient GEMMs; the labels' part waits for gamma and costs a
(T, 1 + W) block per sequence against its own rows of the weight (``Scorer.one_pass``). That is
the three full-size GEMMs of the unfused recipe and no more, as Liger's fused linear
cross-entropy does for its loss; only ``reduction="none"`` (the weights arrive with the
backward) and CTC-DPO's dense path (the weights depend on both sets' log p) run a pass 2 that
recomputes each chunk's logits and turns them into the whole gradient (``Scorer.gradients``).
Extra memory: one chunk of logits plus B x T x (2L+1).

Figures (measured on the CPU, estimated on a GPU): ``docs/perf.md``.

The same machinery scores several target sets against one emission sequence (CTC-DPO's chosen
and rejected units): their emissions come from the same chunk of logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._ctc_engine import Scorer, feasible_by_length, make_target_set
from ._dispatch import choose_backend
from ._precision import autocast_off, cast_all, matmul_dtype, scale_gradients
from .checks import REDUCTIONS, check_bool, check_choice, check_chunk_frames, check_int, check_linear_head, ctc_targets
from .ctc import reduction_weights


class _LinearCTCFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        input_lengths,
        target_lengths,
        blank,
        reduction,
        zero_infinity,
        chunk_frames,
        backend,
    ):
        target_set = make_target_set(targets, target_lengths, blank)
        scorer = Scorer(hidden, weight, bias, input_lengths, [target_set], blank, chunk_frames, backend)
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.zero_infinity, ctx.needs = reduction, zero_infinity, needs
        weights = reduction_weights(target_lengths, reduction, scorer.acc)
        if any(needs) and reduction != "none":  # the coefficients are known: one pass
            coef = weights
            if zero_infinity:
                coef = coef.masked_fill(~feasible_by_length(target_set, input_lengths), 0.0)
            ll, grads = scorer.one_pass(coef, needs)
            infeasible = ll == float("-inf")
            if zero_infinity:
                # Infeasible only by its values (-inf or NaN inputs) yet weighted in the pass:
                # redo the gradient the two-pass way. Never for finite inputs.
                if bool((infeasible & (coef != 0)).any()):
                    grads = _pass2(scorer, weights, infeasible, zero_infinity, needs)
                    grads = tuple(None if g is None else g.to(scorer.acc) for g in grads)
            else:
                grads = _poisoned(grads, infeasible, input_lengths)
            ctx.grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
        else:
            (ll,) = scorer.log_likelihoods(want_occupancy=any(needs))
            infeasible = ll == float("-inf")
        nll = -ll
        if zero_infinity:
            nll = nll.masked_fill(infeasible, 0.0)
        ctx.infeasible = infeasible
        if reduction == "none":
            if any(needs):  # per-sequence weights arrive with the backward: pass 2 waits
                ctx.scorer = scorer
            return nll
        return (nll * weights.to(nll.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        none = (None,) * 8
        if ctx.reduction == "none":
            grads = _pass2(ctx.scorer, grad_loss, ctx.infeasible, ctx.zero_infinity, ctx.needs)
            del ctx.scorer
            return grads + none
        return scale_gradients(ctx.grads, grad_loss) + none


def _poisoned(grads, infeasible, input_lengths):
    """NaN where an infeasible sequence (zero_infinity off) reaches a gradient: its frames'
    rows of the hidden gradient, and all of the weight's and bias' when it has any frame."""
    grad_hidden, grad_weight, grad_bias = grads
    nan = float("nan")
    if grad_hidden is not None:  # in place: a copy of the whole gradient would raise the op's peak
        live = torch.arange(grad_hidden.shape[1], device=infeasible.device)[None, :] < input_lengths[:, None]
        grad_hidden.masked_fill_((infeasible[:, None] & live)[..., None], nan)
    reaches = (infeasible & (input_lengths > 0)).any()  # stays on the device: no host sync
    for grad in (grad_weight, grad_bias):
        if grad is not None:
            grad.masked_fill_(reaches, nan)
    return grad_hidden, grad_weight, grad_bias


def _pass2(scorer: Scorer, coef, infeasible, zero_infinity, needs):
    coef = coef.to(scorer.acc)
    if zero_infinity:
        coef = coef.masked_fill(infeasible, 0.0)
    poison = infeasible if not zero_infinity else torch.zeros_like(infeasible)
    return scorer.gradients([coef], poison.contiguous(), needs)


def linear_ctc_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    input_lengths,
    target_lengths,
    blank: Optional[int] = None,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    chunk_frames: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """CTC loss of a linear head, equal to ``ctc_loss(log_softmax(hidden @ weight.T + bias)
    .transpose(0, 1), ...)`` with its gradients w.r.t. hidden, weight and bias, without the
    (B, T, V) logits.

    Args:
        hidden: (B, T, D) decoder states, batch-first; float32/float64, or bf16/fp16 (float32
            accumulation). Under ``torch.autocast`` the head's GEMMs run in the autocast dtype.
        weight: (V, D) head weight; bias: (V,) or None. V counts the blank.
        targets, input_lengths, target_lengths, reduction, zero_infinity: as ``ctc_loss``.
        blank: index of the blank class; default V - 1 (OpenOmni's convention).
        chunk_frames: frames per chunk (default: from the device, :func:`default_chunk_frames`).
        backend: ``"torch"`` | ``"cpu"`` | ``"triton"``; default by device.

    The gradient is formed during the forward (reductions mean/sum: in pass 1 itself, see the
    module docstring); under ``torch.no_grad()`` only pass 1 runs, without its GEMMs.
    """
    check_linear_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    blank = V - 1 if blank is None else check_int("blank", blank)
    targets, input_lengths, target_lengths = ctc_targets(
        targets, input_lengths, target_lengths, blank, T=T, B=B, C=V, device=hidden.device, name="hidden"
    )
    check_choice("reduction", reduction, REDUCTIONS)
    check_bool("zero_infinity", zero_infinity)
    check_chunk_frames(chunk_frames)
    chosen = choose_backend(hidden.device, backend)
    device = hidden.device.type
    hidden, weight, bias = cast_all(matmul_dtype(device, hidden, weight, bias), (hidden, weight, bias))
    with autocast_off(device):
        return _LinearCTCFunction.apply(
            hidden,
            weight,
            bias,
            targets,
            input_lengths,
            target_lengths,
            blank,
            reduction,
            zero_infinity,
            chunk_frames,
            chosen,
        )
