"""eSpeak NG speech for the demo: 16 kHz float samples, styles that differ as their names say,
voices that differ, and bad arguments."""

import numpy as np
import pytest

from omnifast.demo import STYLES, VOICES, Speaker

TEXT = "The red circle is on the left of the blue square."


@pytest.fixture(scope="module")
def speaker():
    return Speaker()


def median_pitch(samples: np.ndarray) -> float:
    import librosa

    f0, voiced, _ = librosa.pyin(samples, fmin=60, fmax=500, sr=16000, frame_length=1024)
    return float(np.nanmedian(f0[voiced]))


def test_speech_is_16k_float_and_styles_differ(speaker):
    clips = {style: speaker.say(TEXT, style) for style in STYLES}
    for clip in clips.values():
        assert clip.dtype == np.float32 and clip.ndim == 1 and 1.0 < clip.size / 16000 < 8.0
        assert np.abs(clip).max() > 0.05
    assert clips["sad"].size > 1.2 * clips["happy"].size  # slower
    assert median_pitch(clips["happy"]) > 1.2 * median_pitch(clips["sad"])
    assert np.sqrt(np.mean(clips["angry"] ** 2)) > 1.5 * np.sqrt(np.mean(clips["sad"] ** 2))  # louder


def test_voices_differ_and_bad_arguments(speaker):
    a, b = speaker.say(TEXT, voice=VOICES[0]), speaker.say(TEXT, voice=VOICES[1])
    assert a.size != b.size or not np.allclose(a, b)
    with pytest.raises(ValueError, match="unknown style 'bored'"):
        speaker.say(TEXT, "bored")
    with pytest.raises(ValueError, match="empty"):
        speaker.say("  ")
