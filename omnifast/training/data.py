"""OpenOmni / LLaVA JSON data: every record validated before training starts (all problems
reported at once), then encoded by the ``OmniProcessor`` and padded per batch.

A record: ``id``, ``conversations`` (turns with ``from`` human/gpt and ``value``), optional
``image`` (a path, or a list of paths, one per ``<image>``), optional ``speech`` (a path or a list,
one per ``<speech>``), optional ``tgt_units`` / ``re_tgt_units`` (space-separated unit ids),
optional ``emotion``. Paths are relative to the JSON file's folder. Audio: 16-bit PCM or float
WAV files, or ``.npy`` float arrays.
"""
from __future__ import annotations

import json
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from omnifast.models.config import IMAGE_TOKEN, SPEECH_TOKEN
from omnifast.models.processor import IGNORE_INDEX, OmniProcessor, collate

from .stages import Stage


class DataError(ValueError):
    """Everything wrong with a data file, one line per problem."""


@dataclass
class Record:
    id: str
    conversations: List[Dict[str, str]]
    images: List[Path] = field(default_factory=list)
    speech: List[Path] = field(default_factory=list)
    tgt_units: Optional[List[int]] = None
    re_tgt_units: Optional[List[int]] = None
    emotion: Optional[str] = None


def _paths(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _units(text) -> List[int]:
    if isinstance(text, list):
        return [int(u) for u in text]
    return [int(u) for u in str(text).split()]


def load_records(path, stage: Stage, unit_vocab: Optional[int] = None) -> List[Record]:
    """Read and validate a data file for ``stage``; raise :class:`DataError` listing every bad
    record (file, record id, field, what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the data file does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    root, problems, records = path.parent, [], []
    for i, item in enumerate(raw):
        rid = str(item.get("id", f"#{i}")) if isinstance(item, dict) else f"#{i}"

        def bad(field_name: str, what: str) -> None:
            problems.append(f"{path}: record {rid}: {field_name}: {what}")

        if not isinstance(item, dict):
            bad("record", "not a JSON object")
            continue
        if "id" not in item:
            bad("id", "missing")
        turns = item.get("conversations")
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and t.get("from") in ("human", "gpt", "system") and isinstance(t.get("value"), str)
                for t in turns):
            bad("conversations", "must be a non-empty list of {from: human|gpt, value: text}")
            continue
        text = "".join(t["value"] for t in turns)
        record = Record(rid, turns, emotion=item.get("emotion"))
        for key, token, target in (("image", IMAGE_TOKEN, record.images), ("speech", SPEECH_TOKEN, record.speech)):
            files = _paths(item.get(key))
            if text.count(token) != len(files):
                bad(key, f"{text.count(token)} {token} placeholders but {len(files)} files")
            for name in files:
                file = root / name
                if not file.is_file():
                    bad(key, f"missing file {file}")
                target.append(file)
        for key in ("tgt_units", "re_tgt_units"):
            if key not in item:
                continue
            try:
                units = _units(item[key])
            except (TypeError, ValueError):
                bad(key, f"unparsable units {str(item[key])[:40]!r}: expected space-separated integers")
                continue
            if not units:
                bad(key, "empty")
            elif unit_vocab is not None and (min(units) < 0 or max(units) >= unit_vocab):
                bad(key, f"unit out of range [0, {unit_vocab}): {min(units)}..{max(units)}")
            setattr(record, key, units)
        for key in stage.requires:
            if key not in item or item[key] in (None, "", []):
                bad(key, f"required by stage {stage.name!r} but missing")
        if not any(t["from"] == "gpt" for t in turns):
            bad("conversations", "no gpt turn to learn from")
        records.append(record)
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the data:\n" + "\n".join(problems))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 samples of a WAV (16-bit PCM or 32-bit float) or ``.npy`` file."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    with wave.open(str(path)) as handle:
        frames = handle.readframes(handle.getnframes())
        width, channels = handle.getsampwidth(), handle.getnchannels()
    samples = np.frombuffer(frames, dtype={2: np.int16, 4: np.int32}[width]).astype(np.float32)
    samples /= {2: 32768.0, 4: 2147483648.0}[width]
    return samples.reshape(-1, channels).mean(1) if channels > 1 else samples


def write_audio(path: Path, samples: np.ndarray, sampling_rate: int = 16000) -> None:
    """Mono float samples in [-1, 1] -> a 16-bit PCM WAV file (written to a temporary name, then renamed)."""
    path = Path(path)
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sampling_rate)
        handle.writeframes(pcm.tobytes())
    tmp.replace(path)


class ConversationDataset(torch.utils.data.Dataset):
    """Records encoded on access: the processor's input_ids / labels / media, plus units."""

    def __init__(self, records: Sequence[Record], processor: OmniProcessor):
        self.records, self.processor = list(records), processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, object]:
        from PIL import Image
        record = self.records[index]
        images = [np.asarray(Image.open(p).convert("RGB")) for p in record.images]
        audios = [read_audio(p) for p in record.speech]
        item = self.processor.encode_conversation(record.conversations, images, audios)
        item["id"] = record.id
        item["tgt_units"] = record.tgt_units
        item["re_tgt_units"] = record.re_tgt_units
        return item


def pad_units(rows: Sequence[Optional[List[int]]]) -> Optional[torch.Tensor]:
    if any(row is None for row in rows):
        return None
    out = torch.full((len(rows), max(len(r) for r in rows)), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def collate_batch(items: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, object]:
    batch = collate(items, pad_id)
    batch["ids"] = [item["id"] for item in items]
    batch["units"] = pad_units([item["tgt_units"] for item in items])
    batch["rejected_units"] = pad_units([item["re_tgt_units"] for item in items])
    return batch
