"""Modules over omnifast's ops."""
from .ctc import CTCLoss
from .heads import CTCDPOLoss, LinearCTCHead

__all__ = ["CTCLoss", "LinearCTCHead", "CTCDPOLoss"]
