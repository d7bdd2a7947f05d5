"""The demo's building blocks (issue 9): speech from eSpeak NG in several styles."""
from .speech import STYLES, VOICES, Speaker, espeak_available

__all__ = ["Speaker", "STYLES", "VOICES", "espeak_available"]
