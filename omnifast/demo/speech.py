"""Speech for the demo corpus from eSpeak NG, through its C library: the one bundled in the
``espeakng-loader`` wheel, or the system's ``libespeak-ng``. Styles are made with eSpeak's
prosody controls (rate, pitch, pitch range, volume) and voice variants."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from typing import List, Optional, Tuple

import numpy as np

# words per minute, base pitch and pitch range (0-100), volume (0-200)
STYLES = {
    "neutral": dict(rate=165, pitch=50, range=40, volume=100),
    "happy": dict(rate=180, pitch=85, range=100, volume=110),
    "sad": dict(rate=115, pitch=20, range=5, volume=60),
    "angry": dict(rate=215, pitch=35, range=60, volume=190),
}
# eSpeak NG's English voice variants: three speak the omni model's training speech, nine more
# only the speech encoder's pretraining (with those three), one only held-out evaluation speech
TRAIN_VOICES = ("en+m3", "en+f3", "en+m7")
PRETRAIN_VOICES = TRAIN_VOICES + ("en+m1", "en+m2", "en+m4", "en+m5", "en+m6", "en+m8", "en+f1", "en+f2", "en+f5")
EVAL_VOICE = "en+f4"
VOICES = PRETRAIN_VOICES + (EVAL_VOICE,)
_PARAMETERS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}  # espeak_PARAMETER
_SYNCHRONOUS, _POS_CHARACTERS = 2, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _library() -> Tuple[ctypes.CDLL, Optional[str]]:
    try:
        import espeakng_loader

        return ctypes.CDLL(espeakng_loader.get_library_path()), os.path.dirname(espeakng_loader.get_data_path())
    except (ImportError, OSError):
        found = ctypes.util.find_library("espeak-ng")
        if found is None:
            raise RuntimeError(
                "eSpeak NG is not available: install the espeak-ng system package "
                "(libespeak-ng) or `pip install espeakng-loader`"
            ) from None
        return ctypes.CDLL(found), None


def espeak_available() -> bool:
    try:
        _library()
    except RuntimeError:
        return False
    return True


class Speaker:
    """``Speaker().say(text, style, voice)`` -> float32 samples at ``sampling_rate``. eSpeak
    keeps global state, so one engine serves every Speaker, behind a lock."""

    _lock = threading.Lock()

    def __init__(self, sampling_rate: int = 16000):
        self.sampling_rate = sampling_rate
        self._engine = _engine()

    def say(self, text: str, style: str = "neutral", voice: str = VOICES[0]) -> np.ndarray:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; the styles are {', '.join(STYLES)}")
        if not text.strip():
            raise ValueError("text is empty")
        lib, native_rate, chunks = self._engine
        with self._lock:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}")
            for name, value in STYLES[style].items():
                lib.espeak_SetParameter(_PARAMETERS[name], value, 0)
            chunks.clear()
            data = text.encode()
            lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTERS, 0, 0, None, None)
            lib.espeak_Synchronize()
            samples = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
        if native_rate != self.sampling_rate:
            from omnifast.audio import resample

            samples = resample(samples, native_rate, self.sampling_rate)
        return samples.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _engine():
    lib, data_dir = _library()
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    native_rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, data_dir.encode() if data_dir else None, 0)
    if native_rate <= 0:
        raise RuntimeError("eSpeak NG failed to initialise")
    chunks: List[np.ndarray] = []

    def collect(wave, count, _events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wave, shape=(count,)).copy())
        return 0

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    _engine.callback = callback  # the C library holds a pointer to it: keep it alive
    return lib, native_rate, chunks
