"""Checkpoints that run no code and survive a crash.

A checkpoint is a directory of safetensors files (every tensor: weights, optimizer moments, random
generator states) and one JSON file (everything else: step, scheduler, configuration, the Python
and numpy generators). Nothing is unpickled when it is read, so a checkpoint someone else wrote
cannot execute code; a tampered, truncated or incomplete one raises :class:`CheckpointError`
naming the file.

Writing is durable: each file is written and fsynced inside ``<name>.tmp``, the directory is
fsynced, renamed to its final name (atomic) and its parent fsynced. A directory without the
``.tmp`` suffix is therefore complete even after a machine crash; old checkpoints are renamed to
``.deleting`` before they are removed, so a half-removed one is never taken for a checkpoint.
What a killed write or removal leaves behind is swept by the next :func:`prune`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from omnifast.durable import fsync_path

STEP_HOOK: Optional[Callable[[str], None]] = None  # tests inject failures at each write step


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back as written: missing, truncated or tampered."""


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def write_checkpoint(
    final: Path,
    tensor_files: Dict[str, Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]],
    json_files: Dict[str, object],
) -> None:
    """Write ``final`` durably: every file (safetensors: tensors and metadata; JSON) into
    ``final.tmp`` and fsynced, the directory fsynced, renamed, the parent fsynced."""
    from safetensors.torch import save_file

    from omnifast.durable import DiskFull

    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, (tensors, metadata) in tensor_files.items():
            _step(f"write {name}")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name), metadata)
            fsync_path(tmp / name)
        for name, value in json_files.items():
            _step(f"write {name}")
            (tmp / name).write_text(json.dumps(value))
            fsync_path(tmp / name)
        _step("fsync directory")
        fsync_path(tmp)
    except Exception as error:
        full = isinstance(error, OSError) and error.errno == 28 or "No space left" in str(error)
        if full:  # a half-written checkpoint is no checkpoint: remove it, keep the older ones
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFull(final, error if isinstance(error, OSError) else OSError(str(error))) from None
        raise
    if final.exists():  # a rerun of the same step: retire the old copy first
        retire(final)
    _step("rename")
    tmp.rename(final)
    _step("fsync parent")
    fsync_path(final.parent)


def retire(directory: Path) -> None:
    """Remove a checkpoint so that an interruption never leaves it looking complete."""
    doomed = directory.with_name(directory.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    directory.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


LEFTOVER_SUFFIXES = (".tmp", ".deleting")
CHECKPOINT_NAME = re.compile(r"step-\d{8}")


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints under ``root``, oldest first: directories named exactly
    ``step-NNNNNNNN`` (a copy such as "step-00000004 (copy)" is not one)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (renamed from its temporary name, so never half-written)."""
    found = complete_checkpoints(Path(out_dir) / "checkpoints")
    return found[-1] if found else None


def prune(root: Path, keep: int, protect: Sequence[str] = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints under ``root`` (and those named in
    ``protect``: the best one); also remove what an interrupted write (``.tmp``) or removal
    (``.deleting``) left there. Call it only after a write has finished, so that no ``.tmp`` in
    ``root`` is still being written."""
    for old in complete_checkpoints(root)[:-keep]:
        if old.name not in protect:
            retire(old)
    for leftover in root.glob("step-*"):
        if leftover.name.endswith(LEFTOVER_SUFFIXES):
            shutil.rmtree(leftover, ignore_errors=True)


def read_tensors(path: Path, tie: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensor file; with ``tie``, it must carry the tie of the ``state.json`` it
    is read with (each file of one checkpoint is stamped with the same random id when written)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own types for truncated or forged headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error
    if tie is not None and metadata.get("checkpoint") != tie:
        raise CheckpointError(
            f"{path}: not written with this checkpoint's state.json (its tie is "
            f"{metadata.get('checkpoint')!r}, state.json's {tie!r}): a file from another checkpoint "
            f"or run"
        )
    return tensors


MAX_JSON_DEPTH = 32


def read_json(path: Path):
    """A JSON file of a checkpoint, nested at most ``MAX_JSON_DEPTH`` deep."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a checkpoint") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels: not a checkpoint this run wrote")
    return value


def _depth(value, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


# --- nested state (optimizer, scheduler) as JSON + tensors ------------------------------------


def split_tensors(value, prefix: str, tensors: Dict[str, torch.Tensor]):
    """``value`` with every tensor replaced by a reference into ``tensors`` (filled here), and
    tuples and non-string dict keys spelled out, so that JSON gives the same object back."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {prefix})")


def join_tensors(value, tensors: Dict[str, torch.Tensor], where: Path):
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            if value["__tensor__"] not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {value['__tensor__']!r}, which is not stored")
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: join_tensors(v, tensors, where) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(join_tensors(v, tensors, where) for v in value["__tuple__"])
        return {k: join_tensors(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors, where) for v in value]
    return value


# --- random generators --------------------------------------------------------------------------


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """This process's generators: torch's CPU generator and each CUDA device's as tensors; Python's
    and numpy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {
        "python": [version, list(words), gauss],
        "numpy": [kind, int(position), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def set_rng_state(tensors: Dict[str, torch.Tensor], values: Dict[str, object], where: Path) -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        if torch.cuda.is_available() and values["cuda_devices"]:
            if values["cuda_devices"] != torch.cuda.device_count():
                raise CheckpointError(
                    f"{where}: saved with {values['cuda_devices']} CUDA devices, this process sees "
                    f"{torch.cuda.device_count()}"
                )
            torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(values["cuda_devices"])])
        version, words, gauss = values["python"]
        random.setstate((version, tuple(words), gauss))
        kind, position, has_gauss, cached = values["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{where}: random generator state unreadable ({type(error).__name__}: {error})"
        ) from error
