"""Modules over omnifast's ops."""
from .ctc import CTCLoss
from .heads import CTCDPOLoss, LinearCTCHead
from .moe import MoE, MoEOutput, NaiveMoE

__all__ = ["CTCLoss", "LinearCTCHead", "CTCDPOLoss", "MoE", "NaiveMoE", "MoEOutput"]
