"""A data file read in bounded memory: a JSON list of records or JSON Lines, scanned in blocks, each
record's byte offset, byte length and decoded value yielded in turn (so an index of offsets can
read any record back later without holding the file)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator, Optional, Tuple

MAX_RECORD_BYTES = 64 << 20  # a record larger than this is reported rather than buffered
READ_BYTES = 8 << 20
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ValueError):
    """Everything wrong with a data file, one line per problem (file, record, field, what)."""


def scan_records(path: Path) -> Iterator[Tuple[int, int, object]]:
    """(byte offset, byte length, decoded value) of every record, read in 8 MiB blocks: JSON Lines
    for a ``.jsonl`` / ``.ndjson`` file, else a JSON list; a DataError for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    if not head:
        raise DataError(f"{path}: empty file")
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        yield from _scan_lines(path)
    elif head[:1] == b"[":
        yield from _scan_list(path)
    elif head[:1] == b"{":
        raise DataError(
            f"{path}: expected a JSON list of records, got a JSON object (a file of one record per "
            f"line must end in {' or '.join(JSON_LINES_SUFFIXES)})"
        )
    else:
        raise DataError(f"{path}: not JSON: expected a JSON list of records, got {head[:20]!r}")


def _scan_lines(path: Path) -> Iterator[Tuple[int, int, object]]:
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            stripped = line.strip()
            if stripped:
                try:
                    value = json.loads(stripped)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise DataError(f"{path}: line {number}: not JSON ({error})") from None
                except RecursionError:
                    raise DataError(f"{path}: line {number}: nested too deeply to be a record") from None
                yield offset, len(line), value
            offset += len(line)


def _scan_list(path: Path) -> Iterator[Tuple[int, int, object]]:
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, base, position, ascii_text, done = "", 0, 0, True, False  # base: byte offset of text[0]
    with open(path, "rb") as handle:

        def more() -> bool:
            nonlocal text, base, position, ascii_text, done
            if done:
                return False
            block = handle.read(READ_BYTES)
            done = not block
            if base == 0 and not text and block.startswith(codecs.BOM_UTF8):
                block, base = block[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            if position:  # drop what is consumed
                base += position if ascii_text else len(text[:position].encode())
                text, position = text[position:], 0
            try:
                text += utf8.decode(block, final=done)
            except UnicodeDecodeError as error:
                raise DataError(f"{path}: not UTF-8 text ({error})") from None
            ascii_text = text.isascii()
            return True

        def byte_at(index: int) -> int:
            return base + (index if ascii_text else len(text[:index].encode()))

        def skip_space() -> Optional[str]:
            nonlocal position
            while True:
                while position < len(text) and text[position] in " \t\r\n":
                    position += 1
                if position < len(text):
                    return text[position]
                if not more():
                    return None

        more()
        skip_space()
        position += 1  # the opening "["
        if skip_space() == "]":
            return
        while True:
            if skip_space() is None:
                raise DataError(f"{path}: not JSON: the list is not closed")
            start = position
            while True:
                try:
                    value, end = decoder.raw_decode(text, start)
                    break
                except json.JSONDecodeError as error:
                    if byte_at(len(text)) - byte_at(start) > MAX_RECORD_BYTES or not more():
                        raise DataError(f"{path}: not JSON at byte {byte_at(error.pos)} ({error.msg})") from None
                    start = position  # more() may have moved the text
                except RecursionError:
                    raise DataError(
                        f"{path}: the record at byte {byte_at(start)} is nested too deeply to be a record"
                    ) from None
            first, last = byte_at(start), byte_at(end)
            position = end
            yield first, last - first, value
            after = skip_space()
            if after == ",":
                position += 1
            elif after == "]":
                return
            elif after is None:
                raise DataError(f"{path}: not JSON: the list is not closed")
            else:
                raise DataError(f"{path}: not JSON at byte {byte_at(position)}: expected ',' or ']' after a record")
