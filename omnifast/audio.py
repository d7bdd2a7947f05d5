"""Audio in one place: every file read at its own rate, then mixed to mono and resampled
explicitly to the rate a model takes.

Decoding is libsndfile through ``soundfile``: WAV of every subtype (8/16/24/32-bit PCM, float,
A-law, mu-law), FLAC, OGG (Vorbis, Opus) and MP3. Resampling is ``soxr`` at its "HQ" quality,
the resampler librosa itself calls by default (``res_type="soxr_hq"``), used directly so that
reading audio does not import librosa. A ``.npy`` file holds float samples with no rate of
their own: it is taken to be at the rate it is read for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from omnifast.durable import write_durably


class AudioError(ValueError):
    """A file that is not audio omnifast can read (names the file and why)."""


@dataclass(frozen=True)
class AudioInfo:
    format: str  # "WAV", "FLAC", "OGG", "MP3", or "NPY"
    subtype: str  # e.g. "PCM_16", "FLOAT", "VORBIS"
    rate: Optional[int]  # None for .npy (no rate of its own)
    channels: int
    frames: int

    @property
    def seconds(self) -> Optional[float]:
        return None if self.rate is None else self.frames / self.rate


def audio_info(path, verify_end: bool = False) -> AudioInfo:
    """The header of an audio file, or :class:`AudioError`. ``verify_end``: also decode its last
    frame, so that a file cut short (whose header still promises the whole clip) is reported
    here rather than when it is read."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise AudioError(f"{path}: not a readable .npy array ({error})") from None
        if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.floating):
            raise AudioError(
                f"{path}: a .npy clip must hold 1-D (or samples x channels) float samples, "
                f"got shape {array.shape} and dtype {array.dtype}"
            )
        return AudioInfo("NPY", str(array.dtype), None, 1 if array.ndim == 1 else array.shape[1], array.shape[0])
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError, TypeError) as error:
        raise AudioError(f"{path}: not audio that libsndfile reads ({error})") from None
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(
            f"{path}: empty or malformed audio ({info.frames} frames, {info.samplerate} Hz, {info.channels} channels)"
        )
    if verify_end:
        try:
            with soundfile.SoundFile(str(path)) as handle:
                handle.seek(info.frames - 1)
                last = handle.read(1)
        except (RuntimeError, soundfile.LibsndfileError) as error:
            raise AudioError(f"{path}: cut short or corrupt: its last frame cannot be decoded ({error})") from None
        if len(last) != 1:
            raise AudioError(f"{path}: cut short: the header promises {info.frames} frames, fewer are there")
    return AudioInfo(info.format, info.subtype, int(info.samplerate), int(info.channels), int(info.frames))


def read_audio(path, rate: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Float32 samples of a file, mixed to mono, and their rate. With ``rate``, resampled to it
    (a ``.npy`` clip is taken to be at ``rate`` already)."""
    path = Path(path)
    info = audio_info(path)
    if info.format == "NPY":
        if rate is None:
            raise AudioError(f"{path}: a .npy clip has no sampling rate of its own; read it with rate=")
        samples, native = np.load(path, allow_pickle=False).astype(np.float32), rate
    else:
        import soundfile

        try:
            samples, native = soundfile.read(str(path), dtype="float32", always_2d=False)
        except (RuntimeError, soundfile.LibsndfileError) as error:
            raise AudioError(f"{path}: could not be decoded ({error})") from None
    samples = to_mono(samples)
    if rate is not None:
        samples = resample(samples, int(native), rate)
        native = rate
    return samples, int(native)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32: the mean of the channels."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        return samples.mean(axis=1, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"samples must be (frames,) or (frames, channels), got shape {samples.shape}")
    return samples


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 samples from ``rate`` to ``target`` Hz (soxr, HQ)."""
    for name, value in (("rate", rate), ("target", target)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer number of Hz, got {value!r}")
    samples = np.asarray(samples, dtype=np.float32)
    if rate == target or samples.size == 0:
        return samples
    import soxr

    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32)


def write_audio(path, samples: np.ndarray, rate: int = 16000) -> None:
    """Mono float samples in [-1, 1] -> a 16-bit PCM WAV file, written to a temporary name, fsynced
    and renamed, so that a reader never sees half a file."""
    import soundfile

    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    write_durably(path, lambda handle: soundfile.write(handle, clipped, rate, format="WAV", subtype="PCM_16"))
