"""Functional ops. Every op validates its arguments, then dispatches to a backend."""

from . import checks
from ._dispatch import BACKENDS, require_cpu_extension
from .ctc import ctc_log_likelihood, ctc_loss, ctc_loss_with_logits
from .ctc_dpo import CTCDPOOutput, ctc_dpo_loss
from .decode import ctc_greedy_decode
from .dpo_reference import reference_logps
from .linear_ctc import linear_ctc_loss

__all__ = [
    "ctc_loss",
    "ctc_loss_with_logits",
    "ctc_log_likelihood",
    "linear_ctc_loss",
    "ctc_dpo_loss",
    "CTCDPOOutput",
    "reference_logps",
    "ctc_greedy_decode",
    "BACKENDS",
    "require_cpu_extension",
    "checks",
]
