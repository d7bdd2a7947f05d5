"""Judging how speech is said: a style classifier over prosody, and the statistics that compare
two rates of success.

``StyleClassifier`` reads a clip's log-mel spectrogram (its own Whisper feature extractor, 40
bins) as prosody statistics: per-band mean and spread over the voiced frames, their frame-to-frame
change, the frames per character of what is said (speaking rate), and the level's mean and spread
(energy), and maps them to a style label by multinomial logistic regression on standardised
features. Train it on clips that went through the same path as the speech it will judge (e.g.
tokenizer and vocoder), so that the two are judged alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

N_MELS = 40


def prosody_features(log_mel: np.ndarray, characters: int) -> np.ndarray:
    """(n_mels, frames) log-mel of a clip saying ``characters`` characters -> a fixed-length vector."""
    mel = np.asarray(log_mel, dtype=np.float32)
    level = mel.max(0)
    loud = level > level.max() - 0.6
    voiced = mel[:, loud] if loud.any() else mel
    return np.concatenate(
        [
            voiced.mean(1),
            voiced.std(1),
            np.diff(voiced, axis=1).std(1) if voiced.shape[1] > 1 else np.zeros(mel.shape[0], np.float32),
            [
                mel.shape[1] / max(characters, 1) / 10.0,
                voiced.shape[1] / max(characters, 1) / 10.0,
                level.mean(),
                level.std(),
            ],
        ]
    ).astype(np.float32)


class StyleClassifier:
    """``StyleClassifier(styles).fit(waves, texts, labels)``; ``predict(waves, texts)`` -> labels."""

    def __init__(self, styles: Sequence[str], sampling_rate: int = 16000):
        from transformers import WhisperFeatureExtractor

        self.styles, self.sampling_rate = list(styles), sampling_rate
        self.extractor = WhisperFeatureExtractor(
            feature_size=N_MELS, sampling_rate=sampling_rate, hop_length=160, n_fft=400
        )
        self.linear = None

    def features(self, waves: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        if len(waves) != len(texts):
            raise ValueError(f"one text per clip: {len(waves)} clips, {len(texts)} texts")
        rows = []
        for wave, text in zip(waves, texts):
            wave = np.asarray(wave, dtype=np.float32)
            if wave.size < 400:  # no sound: the features of a short silence
                wave = np.zeros(400, np.float32)
            mel = self.extractor(wave, sampling_rate=self.sampling_rate, padding="longest", return_tensors="np")[
                "input_features"
            ][0][:, : wave.size // 160]
            rows.append(prosody_features(mel, len(text)))
        return np.stack(rows)

    def fit(self, waves, texts, labels: Sequence[str], steps: int = 500, seed: int = 0) -> "StyleClassifier":
        unknown = sorted(set(labels) - set(self.styles))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the styles {self.styles}")
        torch.manual_seed(seed)
        x = torch.as_tensor(self.features(waves, texts))
        y = torch.tensor([self.styles.index(label) for label in labels])
        self.mean, self.std = x.mean(0), x.std(0) + 1e-4
        self.linear = torch.nn.Linear(x.shape[1], len(self.styles))
        optimizer = torch.optim.Adam(self.linear.parameters(), lr=0.05, weight_decay=1e-3)
        x = (x - self.mean) / self.std
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(self.linear(x), y).backward()
                optimizer.step()
        return self

    @torch.no_grad()
    def predict(self, waves, texts) -> List[str]:
        if self.linear is None:
            raise RuntimeError("fit the classifier first")
        x = (torch.as_tensor(self.features(waves, texts)) - self.mean) / self.std
        return [self.styles[i] for i in self.linear(x).argmax(-1).tolist()]

    def accuracy(self, waves, texts, labels: Sequence[str]) -> float:
        return float(np.mean([p == t for p, t in zip(self.predict(waves, texts), labels)]))

    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "mean": self.mean,
                "std": self.std,
                "weight": self.linear.weight.detach(),
                "bias": self.linear.bias.detach(),
            },
            str(path / "style_classifier.safetensors"),
        )
        (path / "style_classifier.json").write_text(
            json.dumps({"styles": self.styles, "sampling_rate": self.sampling_rate})
        )

    @classmethod
    def load(cls, path) -> "StyleClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "style_classifier.json").read_text())
        tensors = load_file(str(path / "style_classifier.safetensors"))
        out = cls(meta["styles"], meta["sampling_rate"])
        out.mean, out.std = tensors["mean"], tensors["std"]
        out.linear = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
        out.linear.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
        return out


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> Tuple[float, float]:
    """(z, one-sided p) of the pooled two-proportion z-test that rate b exceeds rate a."""
    for name, value in (("n_a", n_a), ("n_b", n_b)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b):
        raise ValueError(f"successes must lie in [0, n]: {successes_a}/{n_a}, {successes_b}/{n_b}")
    pooled = (successes_a + successes_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:  # both rates 0, or both 1
        return 0.0, 0.5
    z = (successes_b / n_b - successes_a / n_a) / spread
    return z, 0.5 * math.erfc(z / math.sqrt(2))
