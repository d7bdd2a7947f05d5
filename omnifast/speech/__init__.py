"""Speech units and back: FSQ, an EMOVA-style speech tokenizer with a style branch, and a unit
vocoder (mel decoder + Griffin-Lim)."""

from omnifast.nn.fsq import FSQ

from .tokenizer import SpeechTokenizer, SpeechTokenizerConfig, TokenizerOutput
from .train import evaluate_tokenizer, load_corpus, train_tokenizer
from .vocoder import UnitVocoder

__all__ = [
    "FSQ",
    "SpeechTokenizer",
    "SpeechTokenizerConfig",
    "TokenizerOutput",
    "UnitVocoder",
    "train_tokenizer",
    "evaluate_tokenizer",
    "load_corpus",
]
