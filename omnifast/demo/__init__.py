"""The demo's building blocks: speech from eSpeak NG in several styles, and images of
shapes with checkable captions and answers."""

from .images import COLOURS, POSITIONS, SHAPES, Scene, draw, random_scene
from .speech import STYLES, VOICES, Speaker, espeak_available

__all__ = [
    "Speaker",
    "STYLES",
    "VOICES",
    "espeak_available",
    "Scene",
    "draw",
    "random_scene",
    "SHAPES",
    "COLOURS",
    "POSITIONS",
]
