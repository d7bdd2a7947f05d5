"""CTC loss: a drop-in for ``torch.nn.functional.ctc_loss``, a logits variant with the
log_softmax fused in, and per-sequence log-likelihoods.

On the CPU (C++ kernel, torch reference) the forward computes the loss and its gradient in one
call (scaled by the reduction's per-sequence weight) and the backward multiplies by the incoming
gradient. On CUDA (Triton) the forward keeps the state occupancies and the backward writes the
gradient with the incoming gradient folded in. The gradient is the exact derivative w.r.t. the
inputs: -gamma for log-probs (this passes ``gradcheck``, unlike ``F.ctc_loss``'s, which folds in
a log_softmax), softmax - gamma for logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import choose_backend, ctc_kernel
from ._precision import accumulation_dtype, autocast_off
from .checks import REDUCTIONS, CTCArgs, Lengths, check_bool, check_choice, ctc_args


def reduction_weights(target_lengths: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-sequence weights that turn losses into the reduction: 1/(B * max(L, 1)) for mean
    (each loss over its target length, then the batch average), 1 otherwise."""
    if reduction == "mean":
        return 1.0 / (target_lengths.numel() * target_lengths.clamp(min=1).to(dtype))
    return torch.ones(target_lengths.numel(), dtype=dtype, device=target_lengths.device)


class _CTCFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, args: CTCArgs, reduction, zero_infinity, from_logits, backend):
        weight = reduction_weights(args.target_lengths, reduction, accumulation_dtype(inputs.dtype))
        want_grad = ctx.needs_input_grad[0]
        kernel = ctc_kernel(backend)
        nll, saved = kernel.forward(
            args.inputs.contiguous(),
            args.targets,
            args.input_lengths,
            args.target_lengths,
            args.blank,
            zero_infinity,
            weight,
            from_logits,
            want_grad,
        )
        ctx.save_for_backward(*saved)
        ctx.unbatched, ctx.kernel = args.unbatched, kernel
        if reduction == "none":
            return nll.squeeze(0) if args.unbatched else nll
        return (nll * weight).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad = ctx.kernel.backward(ctx.saved_tensors, grad_loss)
        return (grad.squeeze(1) if ctx.unbatched else grad,) + (None,) * 5


def _ctc(inputs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, backend, from_logits, name):
    args = ctc_args(inputs, targets, input_lengths, target_lengths, blank, name=name)
    check_choice("reduction", reduction, REDUCTIONS)
    check_bool("zero_infinity", zero_infinity)
    chosen = choose_backend(inputs.device, backend)
    with autocast_off(inputs.device.type):
        return _CTCFunction.apply(inputs, args, reduction, zero_infinity, from_logits, chosen)


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Connectionist Temporal Classification loss, same signature and semantics as
    ``torch.nn.functional.ctc_loss``.

    Args:
        log_probs: (T, B, C) or unbatched (T, C) log-probabilities, float16/bfloat16/float32/
            float64 (narrow types accumulate in float32; their loss is returned in float32).
        targets: padded (B, S) or concatenated 1-D class indices in [0, C), never ``blank``.
        input_lengths, target_lengths: (B,) tensors or sequences of ints.
        blank: index of the blank class, anywhere in [0, C).
        reduction: ``"none"`` (per-sequence losses), ``"mean"`` (each loss divided by its
            target length, then averaged over the batch) or ``"sum"``.
        zero_infinity: infeasible sequences (too short for their targets) give loss 0 and
            gradient 0 instead of inf and NaN.
        backend: ``"torch"`` | ``"cpu"`` | ``"triton"``; default by device (see ``_dispatch``).

    The gradient is the exact derivative w.r.t. ``log_probs``; through a ``log_softmax`` it
    equals torch's.
    """
    return _ctc(
        log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, backend, False, "log_probs"
    )


def ctc_loss_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``ctc_loss(logits.log_softmax(-1), ...)`` without materialising the log-probs: the
    kernels fuse the log_softmax and write softmax - gamma straight into the logits gradient.
    Arguments as :func:`ctc_loss`, with unnormalised ``logits`` (T, B, C) or (T, C)."""
    return _ctc(
        logits, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, backend, True, "logits"
    )


def ctc_log_likelihood(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    *,
    from_logits: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-sequence log p(targets | inputs), shape (B,) (or () unbatched); -inf where the
    targets are infeasible. Differentiable; ``from_logits`` applies a log_softmax first."""
    nll = _ctc(
        log_probs,
        targets,
        input_lengths,
        target_lengths,
        blank,
        "none",
        False,
        backend,
        from_logits,
        "logits" if from_logits else "log_probs",
    )
    return -nll
