"""The media files a record names: why one cannot be used (read from its header, before step 1),
and a stamp of each (path, size, modification time) for the data's fingerprint."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Optional


@functools.lru_cache(maxsize=65536)
def image_problem(path: Path) -> Optional[str]:
    """Why an image file cannot be used (None if it can): unreadable, truncated or empty."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            kind = image.format
            if kind == "PNG":
                image.verify()  # every chunk's CRC: a truncated or corrupted file fails here
            else:
                image.load()
    except FileNotFoundError:
        return f"missing file {path}"
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{path}: not a readable image ({type(error).__name__}: {error})"
    if width < 1 or height < 1:
        return f"{path}: empty image ({width}x{height})"
    return None


@functools.lru_cache(maxsize=65536)
def audio_problem(path: Path, audio_seconds: Optional[float], rate: Optional[int]) -> Optional[str]:
    """Why an audio file cannot be used: unreadable or unsupported (from its header), or longer
    than the model's speech window (which would cut it)."""
    from omnifast.audio import AudioError, audio_info

    if not path.is_file():
        return f"missing file {path}"
    try:
        info = audio_info(path, verify_end=True)
    except AudioError as error:
        return str(error)
    seconds = info.seconds if info.rate is not None else (info.frames / rate if rate else None)
    if audio_seconds is not None and seconds is not None and seconds > audio_seconds:
        return (
            f"{path}: {seconds:.2f} s of audio is longer than the model's {audio_seconds:g} s speech window "
            f"(it would be cut)"
        )
    return None


def stamp_media(digest, paths: Iterable[Path]) -> None:
    """Add each media file's path, size and modification time, so that an edited file changes the
    data's fingerprint."""
    for path in paths:
        try:
            info = os.stat(path)
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
        except OSError:
            digest.update(f"{path}\0missing\0".encode())
