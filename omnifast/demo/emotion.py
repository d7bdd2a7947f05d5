"""The demo's style classifier: which of the four styles a clip is spoken in, from prosody
statistics of its log-mel spectrogram (per-band mean and spread, frames per character, overall
level), by multinomial logistic regression on standardised features. It is trained on the
corpus' clips after the same round trip generated speech takes (units -> vocoder), so the two
are judged alike."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch


def prosody_features(mel: np.ndarray, characters: int) -> np.ndarray:
    """(n_mels, frames) log-mel -> a fixed-length vector."""
    mel = np.asarray(mel, dtype=np.float32)
    level = mel.max(0)
    voiced = mel[:, level > level.max() - 0.6] if (level > level.max() - 0.6).any() else mel
    return np.concatenate(
        [
            voiced.mean(1),
            voiced.std(1),
            np.diff(voiced, axis=1).std(1),
            [
                mel.shape[1] / max(characters, 1) / 10.0,
                voiced.shape[1] / max(characters, 1) / 10.0,
                level.mean(),
                level.std(),
            ],
        ]
    ).astype(np.float32)


class StyleClassifier:
    def __init__(self, styles: Sequence[str]):
        self.styles = list(styles)
        self.linear = None

    def fit(self, features: np.ndarray, labels: Sequence[str], steps: int = 500, seed: int = 0) -> "StyleClassifier":
        torch.manual_seed(seed)
        x = torch.as_tensor(features, dtype=torch.float32)
        y = torch.tensor([self.styles.index(label) for label in labels])
        self.mean, self.std = x.mean(0), x.std(0) + 1e-4
        self.linear = torch.nn.Linear(x.shape[1], len(self.styles))
        optimizer = torch.optim.Adam(self.linear.parameters(), lr=0.05, weight_decay=1e-3)
        x = (x - self.mean) / self.std
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(self.linear(x), y).backward()
            optimizer.step()
        return self

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> List[str]:
        if self.linear is None:
            raise RuntimeError("fit the classifier first")
        x = (torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std
        return [self.styles[i] for i in self.linear(x).argmax(-1).tolist()]

    def accuracy(self, features: np.ndarray, labels: Sequence[str]) -> float:
        return float(np.mean([p == t for p, t in zip(self.predict(features), labels)]))
