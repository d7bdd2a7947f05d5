"""Modules over omnifast's ops."""

from omnifast.constants import IGNORE_INDEX

from .ar_decoder import ARSpeechDecoder
from .ctc import CTCLoss
from .ctc_decoder import CTCSpeechDecoder
from .decoders import build_speech_decoder
from .fsq import FSQ
from .heads import CTCDPOLoss, LinearCTCHead
from .moe import MoE, MoEOutput, NaiveMoE
from .speech_decoder import SpeechDecoder, SpeechDecoderConfig, SpeechDecoderOutput
from .text_guided import TextGuidedModule

__all__ = [
    "CTCLoss",
    "LinearCTCHead",
    "CTCDPOLoss",
    "MoE",
    "NaiveMoE",
    "MoEOutput",
    "SpeechDecoder",
    "SpeechDecoderConfig",
    "SpeechDecoderOutput",
    "CTCSpeechDecoder",
    "ARSpeechDecoder",
    "build_speech_decoder",
    "TextGuidedModule",
    "FSQ",
    "IGNORE_INDEX",
]
