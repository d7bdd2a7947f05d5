"""Judging how speech is said: the style classifier tells synthetic clips apart by pitch, level
and rate (and keeps its predictions through save/load), and the two-proportion test gives the
textbook figures."""

import math

import numpy as np
import pytest

from omnifast.speech.style import StyleClassifier, two_proportion_test

RATE = 16000
STYLES = {"calm": (220.0, 0.1, 0.12), "excited": (440.0, 0.3, 0.07), "gloomy": (150.0, 0.05, 0.2)}


def say(text: str, style: str, seed: int) -> np.ndarray:
    """One tone burst per character, at the style's pitch, level and duration (with jitter)."""
    rng = np.random.default_rng(seed)
    pitch, level, seconds = STYLES[style]
    pieces = []
    for _ in text:
        t = np.arange(int(seconds * rng.uniform(0.8, 1.2) * RATE)) / RATE
        f = pitch * rng.uniform(0.9, 1.1)
        pieces.append(level * np.sin(2 * np.pi * f * t) * np.hanning(t.size) + 0.2 * level * np.sin(4 * np.pi * f * t))
        pieces.append(np.zeros(int(0.02 * RATE)))
    wave = np.concatenate(pieces)
    return (wave + 0.002 * rng.standard_normal(wave.size)).astype(np.float32)


def clips(count: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        style = list(STYLES)[i % len(STYLES)]
        text = "x" * int(rng.integers(4, 12))
        rows.append((say(text, style, seed * 1000 + i), text, style))
    return rows


def test_the_classifier_tells_styles_apart_on_held_out_clips_and_survives_save_load(tmp_path):
    train, held = clips(60, 0), clips(30, 1)
    classifier = StyleClassifier(list(STYLES)).fit(*zip(*train))
    waves, texts, labels = zip(*held)
    assert classifier.accuracy(waves, texts, labels) >= 0.9
    classifier.save(tmp_path)
    assert StyleClassifier.load(tmp_path).predict(waves, texts) == classifier.predict(waves, texts)
    assert classifier.predict([np.zeros(0, np.float32)], ["x"])[0] in STYLES  # silence is judged, not a crash
    with pytest.raises(ValueError, match="one text per clip"):
        classifier.predict(waves, texts[:-1])
    with pytest.raises(ValueError, match=r"labels \['joyful'\] are not among the styles"):
        StyleClassifier(list(STYLES)).fit(waves, texts, ["joyful"] * len(waves))
    with pytest.raises(RuntimeError, match="fit the classifier first"):
        StyleClassifier(list(STYLES)).predict(waves, texts)


def test_two_proportion_test_gives_the_textbook_figures():
    z, p = two_proportion_test(50, 100, 60, 100)  # pooled 0.55: se 0.0704, z 1.421, one-sided p 0.0776
    assert math.isclose(z, 1.4213, abs_tol=1e-4) and math.isclose(p, 0.0776, abs_tol=1e-4)
    z, p = two_proportion_test(60, 100, 50, 100)
    assert z < 0 and p > 0.9
    assert two_proportion_test(0, 10, 0, 20) == (0.0, 0.5)
    z, p = two_proportion_test(0, 210, 150, 210)
    assert z > 10 and p < 1e-20
    with pytest.raises(ValueError, match="n_a must be a positive integer"):
        two_proportion_test(0, 0, 1, 2)
    with pytest.raises(ValueError, match="successes must lie in"):
        two_proportion_test(3, 2, 1, 2)
