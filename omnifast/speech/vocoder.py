"""``UnitVocoder``: units (+ style) -> waveform. The tokenizer's mel decoder makes a log-mel
spectrogram; the mel filterbank (librosa's, the one Whisper's features use) is inverted by its
pseudo-inverse and the phase found by Griffin-Lim on ``torch.stft``, many clips at once. Style
centroids per label value, computed from the training set (as EMOVA's condition centroids), let
generation ask for "happy, high pitch" without a reference clip."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .tokenizer import HOP, N_FFT, SpeechTokenizer


def log_mel_to_power(log_mel: np.ndarray) -> np.ndarray:
    """Undo Whisper's log-mel scaling ((log10(mel) + 4) / 4; the -8 dB floor is not invertible)."""
    return np.power(10.0, 4.0 * log_mel - 4.0)


@functools.lru_cache(maxsize=8)
def _mel_inverse(sampling_rate: int, n_mels: int) -> torch.Tensor:
    """The pseudo-inverse (n_fft // 2 + 1, n_mels) of the slaney mel filterbank."""
    import librosa

    bank = librosa.filters.mel(sr=sampling_rate, n_fft=N_FFT, n_mels=n_mels)
    return torch.from_numpy(np.linalg.pinv(bank)).float()


def griffin_lim(magnitude: torch.Tensor, n_iter: int = 32, momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """Waveforms (B, frames x hop) whose STFT magnitudes approach ``magnitude`` (B, n_fft // 2 + 1,
    frames): the fast Griffin-Lim algorithm (Perraudin et al., 2013) from a seeded random phase."""
    window = torch.hann_window(N_FFT)
    length = magnitude.shape[-1] * HOP
    phase = torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(seed)) * 2 * np.pi
    angles = torch.polar(torch.ones_like(magnitude), phase)
    previous = torch.zeros_like(angles)

    def wave(a):
        return torch.istft(magnitude * a, N_FFT, HOP, N_FFT, window, length=length)

    for _ in range(n_iter):
        rebuilt = torch.stft(wave(angles), N_FFT, HOP, N_FFT, window, return_complex=True)[..., : magnitude.shape[-1]]
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    return wave(angles)


class UnitVocoder:
    def __init__(
        self,
        tokenizer: SpeechTokenizer,
        centroids: Optional[Dict[str, Dict[str, Sequence[float]]]] = None,
        n_iter: int = 32,
        batch_size: int = 16,
    ):
        self.tokenizer, self.n_iter, self.batch_size = tokenizer, n_iter, batch_size
        self.centroids = {
            name: {value: torch.as_tensor(vector, dtype=torch.float32) for value, vector in values.items()}
            for name, values in (centroids or {}).items()
        }

    @property
    def sampling_rate(self) -> int:
        return self.tokenizer.config.sampling_rate

    @torch.no_grad()
    def fit_centroids(self, audios: Sequence, labels: Dict[str, Sequence[str]]) -> "UnitVocoder":
        """The mean style vector of the clips with each value of each label (none for a units-only
        tokenizer, whose units are all it speaks from)."""
        if not self.tokenizer.config.has_style:
            self.centroids = {}
            return self
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
        """One log-mel (n_mels, frames) -> float32 samples, one hop per frame."""
        return self.mels_to_waves([log_mel])[0]

    def mels_to_waves(self, log_mels: Sequence[np.ndarray]) -> list:
        """Log-mels (n_mels, frames_i) -> float32 waveforms of frames_i x hop samples, inverted
        together (padded to the longest, each cut to its own length)."""
        out = []
        for start in range(0, len(log_mels), self.batch_size):  # bounded memory: a batch at a time
            chunk = log_mels[start : start + self.batch_size]
            frames = [m.shape[1] for m in chunk]
            power = torch.zeros(len(chunk), chunk[0].shape[0], max(frames))
            for i, m in enumerate(chunk):
                power[i, :, : frames[i]] = torch.from_numpy(log_mel_to_power(np.asarray(m, dtype=np.float64))).float()
            stft_power = (_mel_inverse(self.sampling_rate, power.shape[1]) @ power).clamp(min=0)
            waves = griffin_lim(stft_power.sqrt(), self.n_iter)
            out += [waves[i, : n * HOP].numpy().astype(np.float32) for i, n in enumerate(frames)]
        return out

    def _style(self, style: Optional[torch.Tensor], labels: Dict[str, str]) -> torch.Tensor:
        if not self.tokenizer.config.has_style:
            if (style is not None and style.numel()) or labels:
                raise ValueError("this vocoder speaks from units alone (a units-only tokenizer): pass no style")
            return torch.zeros(0)
        return self.style_for(**labels) if style is None else style

    def synthesize(self, units, style: Optional[torch.Tensor] = None, **labels: str) -> Tuple[np.ndarray, int]:
        """Units (T,) and a style vector, or style labels (emotion="happy", pitch="high") ->
        (waveform float32 of 4T x 160 samples, sampling rate). A units-only tokenizer takes
        neither: its units carry the style."""
        return self.synthesize_many([units], style, **labels)[0], self.sampling_rate

    def synthesize_many(self, unit_lists: Sequence, style: Optional[torch.Tensor] = None, **labels: str) -> list:
        """:meth:`synthesize` of many unit sequences in one style, the phase of all of them found
        together; an empty sequence gives an empty waveform."""
        style = self._style(style, labels).to(self.tokenizer.to_mel.weight.device)
        mels = [
            self.tokenizer.decode(torch.as_tensor(list(units), dtype=torch.long), style).float().cpu().numpy()
            for units in unit_lists
            if len(units)
        ]
        waves = iter(self.mels_to_waves(mels))
        return [next(waves) if len(units) else np.zeros(0, dtype=np.float32) for units in unit_lists]

    def save_pretrained(self, path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        values = {name: {v: c.tolist() for v, c in values.items()} for name, values in self.centroids.items()}
        (path / "centroids.json.tmp").write_text(json.dumps({"centroids": values, "n_iter": self.n_iter}))
        (path / "centroids.json.tmp").replace(path / "centroids.json")

    @classmethod
    def from_pretrained(cls, path) -> "UnitVocoder":
        from omnifast.models.safe_load import WeightsError, read_json

        path = Path(path)
        meta = read_json(path / "centroids.json", "vocoder settings") if (path / "centroids.json").is_file() else {}
        tokenizer = SpeechTokenizer.from_pretrained(path)
        try:
            vocoder = cls(tokenizer, meta.get("centroids"), meta.get("n_iter", 32))
        except (TypeError, ValueError, AttributeError) as error:
            raise WeightsError(f"{path / 'centroids.json'}: not a vocoder's settings ({error})") from None
        if not all(torch.isfinite(c).all() for values in vocoder.centroids.values() for c in values.values()):
            raise WeightsError(f"{path / 'centroids.json'}: a style centroid holds NaN or infinite values")
        return vocoder
