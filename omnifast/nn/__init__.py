"""Modules over omnifast's ops."""
from .ctc import CTCLoss

__all__ = ["CTCLoss"]
