"""omnifast: fast, tested kernels and modules for training omni-modal LLMs."""

import os

# MKL may otherwise use fewer threads than asked when the machine is busy, and a matrix product
# split over another number of threads rounds differently: a run would depend on the load.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from . import models, nn, ops  # noqa: E402
from .ops import ctc_dpo_loss, ctc_greedy_decode, ctc_log_likelihood, ctc_loss, ctc_loss_with_logits, linear_ctc_loss

__version__ = "0.1.0"
__all__ = [
    "ops",
    "nn",
    "models",
    "ctc_loss",
    "ctc_loss_with_logits",
    "ctc_log_likelihood",
    "linear_ctc_loss",
    "ctc_dpo_loss",
    "ctc_greedy_decode",
]
