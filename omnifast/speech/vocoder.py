"""``UnitVocoder``: units + style -> waveform. The tokenizer's mel decoder makes a log-mel
spectrogram; librosa inverts the mel filterbank and runs Griffin-Lim. Style centroids per label
value, computed from the training set (as EMOVA's condition centroids), let generation ask for
"happy, high pitch" without a reference clip."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .tokenizer import HOP, N_FFT, SpeechTokenizer


def log_mel_to_power(log_mel: np.ndarray) -> np.ndarray:
    """Undo Whisper's log-mel scaling ((log10(mel) + 4) / 4; the -8 dB floor is not invertible)."""
    return np.power(10.0, 4.0 * log_mel - 4.0)


class UnitVocoder:
    def __init__(self, tokenizer: SpeechTokenizer, centroids: Optional[Dict[str, Dict[str, Sequence[float]]]] = None,
                 n_iter: int = 32):
        self.tokenizer, self.n_iter = tokenizer, n_iter
        self.centroids = {name: {value: torch.as_tensor(vector, dtype=torch.float32) for value, vector in values.items()}
                          for name, values in (centroids or {}).items()}

    @property
    def sampling_rate(self) -> int:
        return self.tokenizer.config.sampling_rate

    @torch.no_grad()
    def fit_centroids(self, audios: Sequence, labels: Dict[str, Sequence[str]]) -> "UnitVocoder":
        """The mean style vector of the clips with each value of each label."""
        styles = torch.stack([self.tokenizer.encode(a)[1].cpu() for a in audios])
        self.centroids = {}
        for name, values in labels.items():
            for value in sorted(set(values)):
                rows = [i for i, v in enumerate(values) if v == value]
                self.centroids.setdefault(name, {})[value] = styles[rows].mean(0)
        return self

    def style_for(self, **labels: str) -> torch.Tensor:
        """The style vector for the labels asked for: the mean of their centroids."""
        if not labels:
            raise ValueError(f"name at least one style label; known: {sorted(self.centroids)}")
        vectors = []
        for name, value in labels.items():
            if name not in self.centroids:
                raise ValueError(f"unknown style label {name!r}; known labels: {sorted(self.centroids)}")
            if value not in self.centroids[name]:
                raise ValueError(f"unknown {name} {value!r}; known values: {sorted(self.centroids[name])}")
            vectors.append(self.centroids[name][value])
        return torch.stack(vectors).mean(0)

    def average_style(self) -> torch.Tensor:
        """The mean of the centroids of the first style label: a voice between all it knows."""
        if not self.centroids:
            raise ValueError("this vocoder has no style centroids: fit_centroids first")
        return torch.stack(list(next(iter(self.centroids.values())).values())).mean(0)

    def mel_to_wave(self, log_mel: np.ndarray) -> np.ndarray:
        import librosa
        power = log_mel_to_power(log_mel)
        wave = librosa.feature.inverse.mel_to_audio(power, sr=self.sampling_rate, n_fft=N_FFT, hop_length=HOP,
                                                    win_length=N_FFT, power=2.0, n_iter=self.n_iter)
        length = power.shape[1] * HOP  # one hop per mel frame
        return np.pad(wave, (0, max(0, length - wave.size)))[:length].astype(np.float32)

    def synthesize(self, units, style: Optional[torch.Tensor] = None, **labels: str) -> Tuple[np.ndarray, int]:
        """Units (T,) and a style vector, or style labels (emotion="happy", pitch="high") ->
        (waveform float32 of 4T x 160 samples, sampling rate)."""
        if style is None:
            style = self.style_for(**labels)
        units = torch.as_tensor(units, dtype=torch.long) if len(units) == 0 else torch.as_tensor(units)
        if units.numel() == 0:  # no units, no sound
            return np.zeros(0, dtype=np.float32), self.sampling_rate
        mel = self.tokenizer.decode(units, style.to(self.tokenizer.to_mel.weight.device))
        return self.mel_to_wave(mel.float().cpu().numpy()), self.sampling_rate

    def save_pretrained(self, path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        values = {name: {v: c.tolist() for v, c in values.items()} for name, values in self.centroids.items()}
        (path / "centroids.json.tmp").write_text(json.dumps({"centroids": values, "n_iter": self.n_iter}))
        (path / "centroids.json.tmp").replace(path / "centroids.json")

    @classmethod
    def from_pretrained(cls, path) -> "UnitVocoder":
        path = Path(path)
        meta = json.loads((path / "centroids.json").read_text()) if (path / "centroids.json").is_file() else {}
        return cls(SpeechTokenizer.from_pretrained(path), meta.get("centroids"), meta.get("n_iter", 32))
