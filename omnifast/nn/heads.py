"""The CTC speech head and its preference loss, as modules."""

from __future__ import annotations

from typing import Optional

import torch

from omnifast.ops import ctc_dpo_loss, linear_ctc_loss, reference_logps
from omnifast.ops.ctc_dpo import CTCDPOOutput


class LinearCTCHead(torch.nn.Linear):
    """Projection of decoder states to ``units`` unit logits plus a blank (``units + 1``
    outputs, blank last by default), whose loss is the fused linear-CTC: the (B, T, V) logits
    are never materialised. Its state dict is that of ``torch.nn.Linear(hidden, units + 1)``,
    so an existing checkpoint loads into it."""

    def __init__(
        self,
        hidden: int,
        units: int,
        blank: Optional[int] = None,
        bias: bool = True,
        chunk_frames: Optional[int] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(hidden, units + 1, bias=bias, device=device, dtype=dtype)
        self.blank = units if blank is None else blank
        if not 0 <= self.blank <= units:
            raise ValueError(f"blank must be in [0, {units}], got {blank}")
        self.chunk_frames, self.backend = chunk_frames, backend

    def loss(
        self,
        hidden: torch.Tensor,
        targets,
        input_lengths,
        target_lengths,
        reduction: str = "mean",
        zero_infinity: bool = False,
    ) -> torch.Tensor:
        """CTC loss of the head's emissions over ``hidden`` (B, T, D)."""
        return linear_ctc_loss(
            hidden,
            self.weight,
            self.bias,
            targets,
            input_lengths,
            target_lengths,
            self.blank,
            reduction,
            zero_infinity,
            chunk_frames=self.chunk_frames,
            backend=self.backend,
        )

    def log_likelihood(self, hidden, targets, input_lengths, target_lengths) -> torch.Tensor:
        """Per-sequence log p(targets | hidden), (B,)."""
        return -linear_ctc_loss(
            hidden,
            self.weight,
            self.bias,
            targets,
            input_lengths,
            target_lengths,
            self.blank,
            "none",
            chunk_frames=self.chunk_frames,
            backend=self.backend,
        )


class CTCDPOLoss(torch.nn.Module):
    """CTC-DPO over a :class:`LinearCTCHead` (see :func:`omnifast.ctc_dpo_loss`)."""

    def __init__(
        self, beta: float = 0.1, length_normalize: bool = False, sft_weight: float = 0.0, zero_infinity: bool = False
    ):
        super().__init__()
        self.beta, self.length_normalize = beta, length_normalize
        self.sft_weight, self.zero_infinity = sft_weight, zero_infinity

    def forward(
        self,
        head: LinearCTCHead,
        hidden,
        chosen,
        rejected,
        input_lengths,
        chosen_lengths,
        rejected_lengths,
        ref_chosen_logps,
        ref_rejected_logps,
    ) -> CTCDPOOutput:
        return ctc_dpo_loss(
            hidden,
            head.weight,
            head.bias,
            chosen,
            rejected,
            input_lengths,
            chosen_lengths,
            rejected_lengths,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            length_normalize=self.length_normalize,
            sft_weight=self.sft_weight,
            blank=head.blank,
            zero_infinity=self.zero_infinity,
            chunk_frames=head.chunk_frames,
            backend=head.backend,
        )

    def reference(self, head: LinearCTCHead, hidden, chosen, rejected, input_lengths, chosen_lengths, rejected_lengths):
        """The reference log-likelihoods of a frozen head, with this loss's normalisation."""
        return reference_logps(
            hidden,
            head.weight,
            head.bias,
            chosen,
            rejected,
            input_lengths,
            chosen_lengths,
            rejected_lengths,
            length_normalize=self.length_normalize,
            blank=head.blank,
            chunk_frames=head.chunk_frames,
            backend=head.backend,
        )
