"""Modules over omnifast's ops."""
from .ctc import CTCLoss
from .heads import CTCDPOLoss, LinearCTCHead
from .moe import MoE, MoEOutput, NaiveMoE
from .speech_decoder import SpeechDecoder, SpeechDecoderConfig, SpeechDecoderOutput
from .text_guided import TextGuidedModule

__all__ = ["CTCLoss", "LinearCTCHead", "CTCDPOLoss", "MoE", "NaiveMoE", "MoEOutput", "SpeechDecoder", "SpeechDecoderConfig",
           "SpeechDecoderOutput", "TextGuidedModule"]
