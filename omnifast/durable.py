"""Files that survive a crash: written to a temporary name, flushed to disk, renamed over the final
name (atomic), and the folder flushed after the rename. A reader sees the old file or the new one,
never half of either; after a machine crash a file that has its final name has all its data."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import IO, Callable, Optional


class DiskFull(OSError):
    """No space was left to write a file: what was half written is removed, what was there before
    is untouched."""

    def __init__(self, path, error: OSError):
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device to write {path} (it was not written; what "
            f"was there before is intact): {error.strerror or error}",
        )
        self.path = path


def _cleanup_on_error(tmp: Path, final: Path, run: Callable[[], None]) -> None:
    """``run()``; on any error the temporary file is removed, and a full disk becomes DiskFull."""
    try:
        run()
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error):
            raise DiskFull(final, error if isinstance(error, OSError) else OSError(str(error))) from None
        raise


def fsync_path(path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(handle)`` into ``path + ".tmp"``, fsync, rename to ``path``, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")

    def run():
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    _cleanup_on_error(tmp, path, run)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def save_durably(path, save: Callable[[str], None]) -> Path:
    """``save(name)`` writes a file by name (a library's writer); it is written as ``path +
    ".tmp"``, flushed, and renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _cleanup_on_error(tmp, path, lambda: (save(str(tmp)), fsync_path(tmp)))
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def write_json(path, value, *, indent: Optional[int] = None, default: Optional[Callable] = None) -> Path:
    """``value`` as JSON at ``path`` (its folder made), written durably: the one JSON writer of
    the library and its benchmarks. ``indent`` and ``default`` as in ``json.dumps``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=indent, default=default)
    return write_durably(path, lambda handle: handle.write(text.encode()))
