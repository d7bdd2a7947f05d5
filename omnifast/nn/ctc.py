"""``CTCLoss``: a drop-in for ``torch.nn.CTCLoss`` backed by omnifast's kernels."""

from __future__ import annotations

from typing import Optional

import torch

from omnifast.ops import ctc_loss, ctc_loss_with_logits


class CTCLoss(torch.nn.Module):
    """Same arguments as ``torch.nn.CTCLoss``; ``from_logits=True`` takes unnormalised logits
    and fuses the log_softmax."""

    def __init__(
        self,
        blank: int = 0,
        reduction: str = "mean",
        zero_infinity: bool = False,
        from_logits: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = blank, reduction, zero_infinity
        self.from_logits, self.backend = from_logits, backend

    def forward(self, inputs, targets, input_lengths, target_lengths):
        fn = ctc_loss_with_logits if self.from_logits else ctc_loss
        return fn(
            inputs,
            targets,
            input_lengths,
            target_lengths,
            self.blank,
            self.reduction,
            self.zero_infinity,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}, "
            f"from_logits={self.from_logits}"
        )
