"""A speech tokenizer: speech -> 25 Hz FSQ units, and back to a log-mel spectrogram, in one of
two modes:

* EMOVA's (``style_dim > 0``): the units say what is said and a global style vector how it is
  said; the mel decoder sees both, so the style has somewhere to go that is not the units.
* OpenOmni's (``style_dim=0``): units alone. The mel decoder sees nothing else, so the units
  carry the prosody too (pitch, energy, speaking rate): an emotional rendition has other units
  than a neutral one, which is what CTC-DPO prefers between.

log-mel (``transformers``' WhisperFeatureExtractor, 16 kHz, 100 frames/s) -> two stride-2
convolutions (25 Hz) -> transformer encoder -> FSQ ([8, 8, 8, 8]: 4096 units). A CTC head over
characters reads the quantised codes (the semantic loss, through omnifast's CTC op). A style
encoder pools the whole mel into one vector with a head per style label the data has (emotion,
pitch, speed, speaker, ...); with ``style_dim=0`` there is no style encoder and the labels are
not used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnifast.nn.fsq import FSQ
from omnifast.ops import ctc_loss_with_logits
from omnifast.ops.fsq import check_levels

HOP, N_FFT, DOWNSAMPLE = 160, 400, 4


@dataclass
class SpeechTokenizerConfig:
    sampling_rate: int = 16000
    n_mels: int = 80
    width: int = 192
    heads: int = 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    levels: Tuple[int, ...] = (8, 8, 8, 8)
    style_dim: int = 64  # 0: units alone (OpenOmni's mode: the units carry the prosody)
    vocabulary: List[str] = field(default_factory=list)  # CTC symbols (characters or phones); blank is extra
    style_labels: Dict[str, List[str]] = field(default_factory=dict)  # label -> its values
    ctc_weight: float = 0.5
    style_weight: float = 0.5

    @classmethod
    def tiny(cls, **overrides) -> "SpeechTokenizerConfig":
        return cls(
            **{**dict(n_mels=32, width=64, heads=2, encoder_layers=2, decoder_layers=2, style_dim=16), **overrides}
        )

    @property
    def has_style(self) -> bool:
        return self.style_dim > 0

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / HOP / DOWNSAMPLE

    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.levels))


@dataclass
class TokenizerOutput:
    loss: torch.Tensor
    mel_loss: torch.Tensor
    ctc_loss: Optional[torch.Tensor]
    style_loss: Optional[torch.Tensor]
    units: torch.Tensor  # (B, T) int64
    unit_lengths: torch.Tensor  # (B,)
    style: torch.Tensor  # (B, style_dim)


def _layers(width: int, heads: int, count: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, count, enable_nested_tensor=False)


class SpeechTokenizer(nn.Module):
    def __init__(self, config: SpeechTokenizerConfig, backend: Optional[str] = None):
        super().__init__()
        from transformers import WhisperFeatureExtractor

        config.levels = check_levels(config.levels)
        self.config, W = config, config.width
        self.features = WhisperFeatureExtractor(
            feature_size=config.n_mels, sampling_rate=config.sampling_rate, hop_length=HOP, n_fft=N_FFT
        )
        self.downsample = nn.Sequential(
            nn.Conv1d(config.n_mels, W, 3, 2, 1), nn.GELU(), nn.Conv1d(W, W, 3, 2, 1), nn.GELU()
        )
        self.encoder = _layers(W, config.heads, config.encoder_layers)
        # normalised input to a linear map: keeps z in tanh's working range, where the
        # straight-through gradient is alive (a saturated z sends every frame to one unit)
        self.to_codes = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, len(config.levels)))
        self.fsq = FSQ(config.levels, backend)
        self.ctc_head = nn.Sequential(
            nn.Linear(len(config.levels), W), nn.GELU(), nn.Linear(W, len(config.vocabulary) + 1)
        )
        if config.has_style:
            self.style_encoder = nn.Sequential(
                nn.Conv1d(config.n_mels, W, 5, 1, 2), nn.GELU(), nn.Conv1d(W, W, 5, 2, 2), nn.GELU()
            )
            self.to_style = nn.Linear(W, config.style_dim)
            self.style_heads = nn.ModuleDict(
                {name: nn.Linear(config.style_dim, len(values)) for name, values in config.style_labels.items()}
            )
        self.from_codes = nn.Linear(len(config.levels), W)
        if config.has_style:
            self.from_style = nn.Linear(config.style_dim, W)
        self.decoder_conv = nn.Conv1d(W, W, 5, 1, 2)
        self.decoder = _layers(W, config.heads, config.decoder_layers)
        self.to_mel = nn.Linear(W, config.n_mels)

    # ---- audio in -----------------------------------------------------------------------------
    def check_audio(self, audio, sampling_rate: Optional[int] = None, resample: bool = False) -> np.ndarray:
        """One mono clip as float32 samples at the tokenizer's rate, or a clear error."""
        rate = self.config.sampling_rate
        wave = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if wave.ndim == 2 and min(wave.shape) <= 8:
            raise ValueError(f"audio must be mono (1-D samples), got shape {wave.shape}: mix the channels down first")
        if wave.ndim != 1:
            raise ValueError(f"audio must be 1-D samples, got shape {wave.shape}")
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"audio must hold float samples in [-1, 1], got dtype {wave.dtype}")
        if np.isnan(wave).any():
            raise ValueError("audio has NaN samples")
        given = rate if sampling_rate is None else sampling_rate
        if given != rate:
            if not resample:
                raise ValueError(
                    f"audio must be sampled at {rate} Hz, got {given} Hz; pass resample=True to resample it"
                )
            from omnifast.audio import resample

            wave = resample(wave, given, rate)
        if wave.shape[0] < HOP * DOWNSAMPLE:
            raise ValueError(
                f"audio is empty or shorter than one unit ({HOP * DOWNSAMPLE} samples at {rate} Hz), "
                f"got {wave.shape[0]} samples"
            )
        return wave.astype(np.float32)

    def mel(self, audios: Sequence, sampling_rate: Optional[int] = None, resample: bool = False):
        """Log-mel (B, n_mels, frames) of each clip, right-padded, and the frame counts (B,)."""
        waves = [self.check_audio(a, sampling_rate, resample) for a in audios]
        mels = [
            torch.from_numpy(
                self.features(w, sampling_rate=self.config.sampling_rate, padding="longest", return_tensors="np")[
                    "input_features"
                ][0]
            )
            for w in waves
        ]
        frames = torch.tensor([(len(w) // HOP) // DOWNSAMPLE * DOWNSAMPLE for w in waves])
        out = torch.zeros(len(mels), self.config.n_mels, int(frames.max()))
        for i, m in enumerate(mels):
            out[i, :, : frames[i]] = m[:, : frames[i]]
        return out.to(self.to_mel.weight.device), frames.to(self.to_mel.weight.device)

    # ---- the two branches -----------------------------------------------------------------------
    def quantise(self, mel: torch.Tensor, frames: torch.Tensor):
        """Units (B, T), codes (B, T, D) and unit counts (B,) at 25 Hz."""
        x = self.downsample(mel).transpose(1, 2)
        lengths = frames // DOWNSAMPLE
        pad = torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        x = self.encoder(x, src_key_padding_mask=pad)
        codes, units = self.fsq(self.to_codes(x))
        return units, codes, lengths

    def style(self, mel: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The style vectors (B, style_dim); (B, 0) for a units-only tokenizer."""
        if not self.config.has_style:
            return mel.new_zeros(mel.shape[0], 0)
        x = self.style_encoder(mel)  # (B, W, frames / 2)
        valid = (torch.arange(x.shape[2], device=x.device)[None] < (frames[:, None] + 1) // 2).to(x.dtype)
        pooled = (x * valid[:, None]).sum(2) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.to_style(pooled)

    def decode_codes(self, codes: torch.Tensor, style: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.from_codes(codes)
        if self.config.has_style:
            x = x + self.from_style(style)[:, None]
        x = x.repeat_interleave(DOWNSAMPLE, dim=1)
        x = x + self.decoder_conv(x.transpose(1, 2)).transpose(1, 2)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= (lengths * DOWNSAMPLE)[:, None]
        return self.to_mel(self.decoder(x, src_key_padding_mask=pad)).transpose(1, 2)  # (B, n_mels, frames)

    # ---- training -------------------------------------------------------------------------------
    def forward(
        self,
        mel: torch.Tensor,
        frames: torch.Tensor,
        texts: Optional[Sequence[str]] = None,
        labels: Optional[Dict[str, Sequence[str]]] = None,
    ) -> TokenizerOutput:
        units, codes, lengths = self.quantise(mel, frames)
        style = self.style(mel, frames)
        predicted = self.decode_codes(codes, style, lengths)
        mask = (torch.arange(mel.shape[2], device=mel.device)[None] < frames[:, None]).to(mel.dtype)[:, None]
        mel_loss = ((predicted[..., : mel.shape[2]] - mel).abs() * mask).sum() / (mask.sum() * mel.shape[1])
        loss, ctc, style_loss = mel_loss, None, None
        if texts is not None and self.config.vocabulary:
            targets = [self.text_to_ids(t) for t in texts]
            flat = torch.tensor([i for t in targets for i in t], dtype=torch.long, device=mel.device)
            logits = self.ctc_head(codes).transpose(0, 1)  # (T, B, C)
            ctc = ctc_loss_with_logits(
                logits, flat, lengths, [len(t) for t in targets], blank=len(self.config.vocabulary), zero_infinity=True
            )
            loss = loss + self.config.ctc_weight * ctc
        if labels and self.config.has_style:
            losses = []
            for name, values in labels.items():
                target = torch.tensor([self.label_index(name, v) for v in values], device=mel.device)
                losses.append(F.cross_entropy(self.style_heads[name](style), target))
            style_loss = sum(losses) / len(losses)
            loss = loss + self.config.style_weight * style_loss
        return TokenizerOutput(loss, mel_loss, ctc, style_loss, units, lengths, style)

    def text_to_ids(self, text: str) -> List[int]:
        index = {s: i for i, s in enumerate(self.config.vocabulary)}
        return [index[c] for c in text if c in index]

    def label_index(self, name: str, value: str) -> int:
        if name not in self.config.style_labels:
            raise ValueError(f"unknown style label {name!r}; this tokenizer knows {sorted(self.config.style_labels)}")
        values = self.config.style_labels[name]
        if value not in values:
            raise ValueError(f"unknown {name} {value!r}; known values: {values}")
        return values.index(value)

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio, sampling_rate: Optional[int] = None, resample: bool = False):
        """One clip -> (units (T,) int64 at 25 Hz, style vector (style_dim,))."""
        mel, frames = self.mel([audio], sampling_rate, resample)
        units, _, lengths = self.quantise(mel, frames)
        return units[0, : lengths[0]], self.style(mel, frames)[0]

    @torch.no_grad()
    def decode(self, units: torch.Tensor, style: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Units (T,) + style (style_dim,; none for a units-only tokenizer) -> log-mel (n_mels, 4T)."""
        if style is None:
            if self.config.has_style:
                raise ValueError(
                    f"this tokenizer decodes units with a style vector (style_dim={self.config.style_dim}): pass style"
                )
            style = torch.zeros(0)
        units = torch.as_tensor(units, device=self.to_mel.weight.device)
        codes = self.fsq.indices_to_codes(units).to(self.to_mel.weight.dtype)  # checks the codebook range
        return self.decode_codes(codes[None], style[None], torch.tensor([units.numel()], device=units.device))[0]

    @torch.no_grad()
    def transcribe(self, audio, sampling_rate: Optional[int] = None) -> str:
        """Greedy CTC reading of the units (the semantic head)."""
        from omnifast.ops import ctc_greedy_decode

        mel, frames = self.mel([audio], sampling_rate)
        _, codes, lengths = self.quantise(mel, frames)
        ids = ctc_greedy_decode(self.ctc_head(codes), lengths, blank=len(self.config.vocabulary))[0]
        return "".join(self.config.vocabulary[i] for i in ids)

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / "tokenizer.safetensors.tmp"))
        (path / "tokenizer.safetensors.tmp").replace(path / "tokenizer.safetensors")
        (path / "tokenizer.json.tmp").write_text(json.dumps(asdict(self.config), indent=2))
        (path / "tokenizer.json.tmp").replace(path / "tokenizer.json")

    @classmethod
    def from_pretrained(cls, path) -> "SpeechTokenizer":
        """A folder written by :meth:`save_pretrained`; every error names its file, every tensor is
        checked (shape, dtype, finite values)."""
        from omnifast.models.safe_load import WeightsError, check_tensors, read_json, read_safetensors

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: not a directory written by save_pretrained")
        values = read_json(path / "tokenizer.json", "speech tokenizer settings")
        try:
            values["levels"] = tuple(values["levels"])
            model = cls(SpeechTokenizerConfig(**values))
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsError(f"{path / 'tokenizer.json'}: not a speech tokenizer's settings ({error})") from None
        weights = path / "tokenizer.safetensors"
        tensors, expected = read_safetensors(weights), model.state_dict()
        if set(tensors) != set(expected):
            raise WeightsError(
                f"{weights}: does not hold this tokenizer's tensors (missing: "
                f"{sorted(set(expected) - set(tensors))[:5]}; unexpected: "
                f"{sorted(set(tensors) - set(expected))[:5]})"
            )
        model.load_state_dict(check_tensors(tensors, expected, weights))
        return model.eval()
