"""The demo's judge of intelligibility: a small speech recogniser trained for judging only (never
part of the omni model, trained on nothing the omni model makes), which transcribes generated
speech for the text-to-speech CER.

Log-mel (Whisper's features, 40 bins) -> two stride-2 convolutions -> a 2-layer bidirectional GRU
-> a CTC head over the corpus' characters, trained with omnifast's CTC loss on eSpeak clips of
many voices and on the unit voice's clips after the tokenizer + vocoder round trip (so that it
has heard how vocoded speech sounds; never on generated speech)."""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from omnifast.ops import ctc_greedy_decode, ctc_loss_with_logits


class Judge(nn.Module):
    def __init__(self, alphabet: Sequence[str], n_mels: int = 40, width: int = 128):
        super().__init__()
        from transformers import WhisperFeatureExtractor

        self.alphabet = list(alphabet)
        self.features = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, n_fft=400)
        self.convs = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, 2, 1), nn.GELU(), nn.Conv1d(width, width, 3, 2, 1), nn.GELU()
        )
        self.rnn = nn.GRU(width, width, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.head = nn.Linear(2 * width, len(self.alphabet) + 1)  # blank last

    def mel(self, waves: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, frames) log-mel of each clip, right-padded, and the frames of each after the
        two convolutions."""
        mels = [
            torch.from_numpy(
                self.features(w, sampling_rate=16000, padding="longest", return_tensors="np")["input_features"][0]
            )
            for w in waves
        ]
        frames = torch.tensor([m.shape[1] for m in mels])
        out = torch.zeros(len(mels), mels[0].shape[0], int(frames.max()))
        for i, m in enumerate(mels):
            out[i, :, : m.shape[1]] = m
        return out, (frames + 3) // 4

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.convs(mel).transpose(1, 2)
        return self.head(self.rnn(x)[0])  # (B, T/4, classes)

    def ids(self, text: str) -> List[int]:
        return [self.alphabet.index(c) for c in text if c in self.alphabet]

    @torch.no_grad()
    def transcribe(self, waves: Sequence[np.ndarray], batch_size: int = 32) -> List[str]:
        self.eval()
        out = []
        for start in range(0, len(waves), batch_size):
            chunk = [w if len(w) >= 640 else np.pad(w, (0, 640 - len(w))) for w in waves[start : start + batch_size]]
            mel, lengths = self.mel(chunk)
            for ids in ctc_greedy_decode(self(mel), lengths, blank=len(self.alphabet)):
                out.append("".join(self.alphabet[i] for i in ids))
        return out


def _augment(mel: torch.Tensor, rng: random.Random) -> torch.Tensor:
    mel = mel.clone()
    for row in mel:
        start = rng.randrange(0, mel.shape[1] - 6)
        row[start : start + rng.randrange(0, 6)] = 0
        for _ in range(2):
            start = rng.randrange(0, max(1, mel.shape[2] - 20))
            row[:, start : start + rng.randrange(0, 16)] = 0
    return mel


def train_judge(
    clips: Sequence[Tuple[np.ndarray, str]],
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> Judge:
    """A judge trained on (wave, text) clips for ``steps`` AdamW steps (one-cycle schedule,
    SpecAugment-style masks)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    judge = Judge(sorted({c for _, text in clips for c in text}))
    mels = [judge.mel([wave]) for wave, _ in clips]
    targets = [torch.tensor(judge.ids(text)) for _, text in clips]
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    judge.train()
    for _ in tqdm(range(steps), desc="judge", disable=not progress):
        batch = [rng.randrange(len(clips)) for _ in range(batch_size)]
        longest = max(mels[i][0].shape[2] for i in batch)
        mel = torch.zeros(len(batch), mels[0][0].shape[1], longest)
        for row, i in enumerate(batch):
            mel[row, :, : mels[i][0].shape[2]] = mels[i][0][0]
        logits = judge(_augment(mel, rng)).transpose(0, 1)
        lengths = torch.cat([mels[i][1] for i in batch])
        loss = ctc_loss_with_logits(
            logits,
            torch.cat([targets[i] for i in batch]),
            lengths,
            torch.tensor([len(targets[i]) for i in batch]),
            blank=len(judge.alphabet),
            zero_infinity=True,
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return judge.eval()
