"""Functional ops. Every op validates its arguments, then dispatches to a backend."""
from . import _dispatch
from .ctc import ctc_log_likelihood, ctc_loss, ctc_loss_with_logits

__all__ = ["ctc_loss", "ctc_loss_with_logits", "ctc_log_likelihood", "_dispatch"]
