"""Whole models: ``OmniConfig`` presets, ``OmniModel`` and its ``OmniProcessor``."""

from .components import load_components, load_speech_decoder, save_speech_decoder
from .config import IMAGE_TOKEN, SPEECH_TOKEN, OmniConfig
from .omni import COMPONENTS, AnswerEvent, GenerateOutput, OmniModel, OmniOutput, response_states
from .processor import IGNORE_INDEX, OmniProcessor, add_placeholder_tokens, build_tiny_tokenizer, collate

__all__ = [
    "OmniConfig",
    "OmniModel",
    "OmniOutput",
    "AnswerEvent",
    "GenerateOutput",
    "OmniProcessor",
    "add_placeholder_tokens",
    "build_tiny_tokenizer",
    "collate",
    "response_states",
    "load_components",
    "save_speech_decoder",
    "load_speech_decoder",
    "COMPONENTS",
    "IMAGE_TOKEN",
    "SPEECH_TOKEN",
    "IGNORE_INDEX",
]
