"""OpenOmni / LLaVA records: read from a JSON list or JSON Lines file in bounded memory, every
record and every media file it names validated before training starts (all problems reported at
once), then read back one record at a time by its byte offset.

A record: ``id``, ``conversations`` (turns with ``from`` human/gpt/system and ``value``),
optional ``image`` (a path, or a list of paths, one per ``<image>``), optional ``speech`` (a
path or a list, one per ``<speech>``; any format ``omnifast.audio`` reads, at any rate; or, as in
OpenOmni's data, one per human turn with no ``<speech>`` in the text: the spoken versions of the
written questions, ``"none"`` for a turn without one),
optional ``tgt_units`` / ``re_tgt_units`` (space-separated unit ids, or a list), optional
``emotion``. Paths are relative to the data file's folder, and must stay inside it (or inside
another allowed media root).

Only the offsets and a few integers per record stay in memory (about 30 bytes a record), so a
data set of millions of records costs tens of MB per process, and each DataLoader worker reads
just the records it is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from omnifast.models.config import IMAGE_TOKEN, SPEECH_TOKEN

from .data_file import READ_BYTES, DataError, scan_records
from .media import audio_problem, image_problem, stamp_media
from .stages import Stage

MAX_PROBLEMS = 200  # problems listed in a DataError (the rest are counted)
TEXT_BYTES_PER_POSITION = 16  # no tokenizer packs more text into one position: a cap on a record's text


@dataclass
class Record:
    id: str
    conversations: List[Dict[str, str]]
    images: List[Path] = field(default_factory=list)
    speech: List[Path] = field(default_factory=list)
    tgt_units: Optional[List[int]] = None
    re_tgt_units: Optional[List[int]] = None
    emotion: Optional[str] = None
    spoken: List[Optional[Path]] = field(default_factory=list)  # per human turn: its spoken version (or None)

    def audio_files(self) -> List[Path]:
        return self.speech + [f for f in self.spoken if f is not None]

    def media_files(self) -> List[Path]:
        return self.images + self.audio_files()


# --- one record ---------------------------------------------------------------------------------


def _paths(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _units(text) -> List[int]:
    if isinstance(text, list):
        if not all(isinstance(u, int) and not isinstance(u, bool) for u in text):
            raise ValueError("not integers")
        return list(text)
    return [int(u) for u in str(text).split()]


@dataclass(frozen=True)
class RecordRules:
    """What a record must satisfy: the stage's required fields, the unit vocabulary, the folders
    media may come from and the longest clip the model's speech window takes."""

    stage: Stage
    unit_vocab: Optional[int] = None
    media_roots: Tuple[Path, ...] = ()
    audio_seconds: Optional[float] = None
    max_units: Optional[int] = None  # the speech decoder's positions
    max_text: Optional[int] = None  # bytes of text a record may hold


def parse_record(item, position: int, root: Path, rules: RecordRules, bad) -> Optional[Record]:
    """A :class:`Record` from one decoded JSON value; every problem goes to ``bad(field, what)``
    (no file is opened here)."""
    if not isinstance(item, dict):
        bad("record", "not a JSON object")
        return None
    if "id" not in item:
        bad("id", "missing")
    elif not isinstance(item["id"], str) or not item["id"].strip():
        shown = f"the {type(item['id']).__name__} {item['id']!r}" if not isinstance(item["id"], str) else "empty"
        bad(
            "id",
            f"must be a non-empty string, got {shown}"
            + (f' (write it as "{item["id"]}")' if isinstance(item["id"], int) else ""),
        )
    turns = item.get("conversations")
    if (
        not isinstance(turns, list)
        or not turns
        or not all(
            isinstance(t, dict) and t.get("from") in ("human", "gpt", "system") and isinstance(t.get("value"), str)
            for t in turns
        )
    ):
        bad("conversations", "must be a non-empty list of {from: human|gpt|system, value: text}")
        return None
    text = "".join(t["value"] for t in turns)
    if any(t["from"] == "gpt" and not t["value"].strip() for t in turns):
        bad("conversations", "a gpt turn is empty: there is nothing to learn from it")
    if rules.max_text is not None and len(text.encode()) > rules.max_text:
        bad(
            "conversations",
            f"{len(text.encode())} bytes of text, more than this model can take "
            f"({rules.max_text}: its {rules.max_text // TEXT_BYTES_PER_POSITION} positions)",
        )
    emotion = item.get("emotion")
    if emotion is not None and not isinstance(emotion, str):
        bad("emotion", f"must be text, got {type(emotion).__name__}")
    record = Record(str(item.get("id", f"#{position}")), turns, emotion=emotion)
    humans = sum(t["from"] == "human" for t in turns)
    speech_files = item.get("speech")
    alternatives = bool(
        speech_files
        and text.count(SPEECH_TOKEN) == 0
        and isinstance(speech_files, (str, list))
        and len(_paths(speech_files)) == humans
    )
    if alternatives:
        # OpenOmni's layout: one clip per human turn, the spoken alternative of its written text
        # ("none" marks a turn without one); which a step sees is drawn per (seed, epoch, record)
        for name in _paths(speech_files):
            if not isinstance(name, str):
                bad("speech", "must be a path or a list of paths")
            elif "\x00" in name:
                bad("speech", f"{name!r} has a NUL byte: not a path")
            elif "none" in name:
                record.spoken.append(None)
            else:
                file = (root / name).resolve()
                if not any(file.is_relative_to(allowed) for allowed in rules.media_roots):
                    bad("speech", f"{name} is outside the data folder {root} (allow its folder with --media-root)")
                record.spoken.append(file)
        if not any(record.spoken):  # every turn "none": a written record
            record.spoken = []
    for key, token, target in (("image", IMAGE_TOKEN, record.images), ("speech", SPEECH_TOKEN, record.speech)):
        if key == "speech" and alternatives:
            continue
        value = item.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            bad(key, "must be a path or a list of paths")
            continue
        files = _paths(value)
        if text.count(token) != len(files):
            bad(key, f"{text.count(token)} {token} placeholders but {len(files)} files")
        for name in files:
            if "\x00" in name:
                bad(key, f"{name!r} has a NUL byte: not a path")
                continue
            file = (root / name).resolve()
            if not any(file.is_relative_to(allowed) for allowed in rules.media_roots):
                bad(key, f"{name} is outside the data folder {root} (allow its folder with --media-root)")
                continue
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
        elif rules.unit_vocab is not None and (min(units) < 0 or max(units) >= rules.unit_vocab):
            bad(key, f"unit out of range [0, {rules.unit_vocab}): {min(units)}..{max(units)}")
        elif rules.max_units is not None and len(units) > rules.max_units:
            bad(key, f"{len(units)} units, more than the speech decoder's {rules.max_units} positions")
        setattr(record, key, units)
    for key in rules.stage.requires:
        if key not in item or item[key] in (None, "", []):
            bad(key, f"required by stage {rules.stage.name!r} but missing")
    if not any(t["from"] == "gpt" for t in turns):
        bad("conversations", "no gpt turn to learn from")
    return record


# --- media files ---------------------------------------------------------------------------------


def media_problems(record: Record, rules: RecordRules, rate: Optional[int] = None) -> List[Tuple[str, str]]:
    out = [("image", p) for p in map(image_problem, record.images) if p]
    out += [("speech", p) for p in (audio_problem(f, rules.audio_seconds, rate) for f in record.audio_files()) if p]
    return out


class RecordFile(Sequence):
    """The validated records of one data file, read back by index (a Sequence of
    :class:`Record`). Holds byte offsets and per-record sizes, never the records; safe to send
    to DataLoader workers (each opens the file itself)."""

    def __init__(
        self,
        path: Path,
        rules: RecordRules,
        offsets,
        lengths,
        response_chars,
        units,
        fingerprint: str,
        media_counts: Optional[Dict[str, int]] = None,
    ):
        self.path, self.root, self.rules, self.fingerprint = path, path.resolve().parent, rules, fingerprint
        self.offsets, self.lengths = offsets, lengths
        self.response_chars, self.units = response_chars, units  # for length bucketing
        self.media_counts = media_counts or {}
        self._handle = None

    def count_with(self, media: str) -> int:
        """How many records have ``media`` ("images" or "speech": clips or spoken alternatives)."""
        return self.media_counts.get(media, 0)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(int(self.offsets[index]))
        value = json.loads(self._handle.read(int(self.lengths[index])))

        def bad(field_name, what):
            raise DataError(
                f"{self.path}: record #{index}: {field_name}: {what} (the file changed after it was checked)"
            )

        return parse_record(value, index, self.root, self.rules, bad)

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self._handle.close()


def load_records(
    path,
    stage: Stage,
    unit_vocab: Optional[int] = None,
    *,
    media_roots: Sequence = (),
    audio_seconds: Optional[float] = None,
    sampling_rate: Optional[int] = None,
    max_units: Optional[int] = None,
    max_positions: Optional[int] = None,
) -> RecordFile:
    """Read and validate a data file (a JSON list of records, or JSON Lines) for ``stage``: every
    field, every media file's header (audio: format, rate, channels, length against
    ``audio_seconds``; images: format, size, integrity), duplicate ids. Raise :class:`DataError`
    listing every problem (file, record id, field, what is wrong) before anything trains.
    ``media_roots``: folders besides the data file's own that media may come from;
    ``max_units``: the speech decoder's positions; ``max_positions``: the LLM's (a record's text
    may hold at most ``TEXT_BYTES_PER_POSITION`` bytes a position; its tokens are counted when it
    is encoded)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file (a JSON list or JSON Lines file of records)")
    if not path.is_file():
        raise DataError(f"{path}: the data file does not exist")
    root = path.resolve().parent
    max_text = None if max_positions is None else max_positions * TEXT_BYTES_PER_POSITION
    rules = RecordRules(
        stage, unit_vocab, (root,) + tuple(Path(r).resolve() for r in media_roots), audio_seconds, max_units, max_text
    )
    problems: List[str] = []
    counted = 0
    offsets, lengths, response_chars, units, hashes = (array("q") for _ in range(5))  # 8 bytes a value
    media = hashlib.sha256()
    media_counts = {"images": 0, "speech": 0}
    for position, (offset, length, item) in enumerate(scan_records(path)):
        rid = str(item.get("id", f"#{position}")) if isinstance(item, dict) else f"#{position}"

        def bad(field_name: str, what: str, rid: str = rid) -> None:
            nonlocal counted
            counted += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"{path}: record {rid}: {field_name}: {what}")

        record = parse_record(item, position, root, rules, bad)
        if record is not None:
            for field_name, what in media_problems(record, rules, sampling_rate):
                bad(field_name, what)
            stamp_media(media, record.media_files())
            media_counts["images"] += bool(record.images)
            media_counts["speech"] += bool(record.audio_files())
            answer = [t["value"] for t in record.conversations if t["from"] == "gpt"]
            response_chars.append(len(answer[-1]) if answer else 0)
            units.append(max(len(record.tgt_units or ()), len(record.re_tgt_units or ())))
            hashes.append(hash(record.id))
        offsets.append(offset)
        lengths.append(length)
    if len(hashes) and len(np.unique(np.frombuffer(hashes, dtype=np.int64))) < len(hashes):
        for rid in _duplicate_ids(path, hashes):
            bad_id = f"{path}: record {rid}: id: appears more than once (records are keyed by id)"
            counted += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(bad_id)
    if problems:
        more = f"\n... and {counted - len(problems)} more" if counted > len(problems) else ""
        raise DataError(f"{counted} problem(s) in the data:\n" + "\n".join(problems) + more)
    if not offsets:
        raise DataError(f"{path}: no records")
    as_array = functools.partial(np.frombuffer, dtype=np.int64)
    content = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(READ_BYTES), b""):
            content.update(block)
    return RecordFile(
        path,
        rules,
        as_array(offsets),
        as_array(lengths),
        as_array(response_chars),
        as_array(units),
        f"{content.hexdigest()}-{media.hexdigest()}",
        media_counts,
    )


def data_fingerprint(records: Sequence[Record]) -> str:
    """A digest of the records and of the media files they name (size and modification time):
    equal for the same data, different after any edit."""
    if isinstance(records, RecordFile):
        return records.fingerprint
    digest = hashlib.sha256()
    for record in records:
        digest.update(
            json.dumps(
                [
                    record.id,
                    record.conversations,
                    [str(p) for p in record.images],
                    [str(p) for p in record.speech],
                    record.tgt_units,
                    record.re_tgt_units,
                    record.emotion,
                    [str(p) for p in record.spoken],
                ]
            ).encode()
        )
        stamp_media(digest, record.media_files())
    return digest.hexdigest()


def _duplicate_ids(path: Path, hashes) -> List[str]:
    """The ids that occur more than once (found again by a second pass over the file)."""
    values, counts = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
    suspects, seen, repeated = set(values[counts > 1].tolist()), set(), []
    for _, _, item in scan_records(path):
        rid = str(item.get("id")) if isinstance(item, dict) else None
        if rid is not None and hash(rid) in suspects:
            if rid in seen and rid not in repeated:
                repeated.append(rid)
            seen.add(rid)
    return repeated
