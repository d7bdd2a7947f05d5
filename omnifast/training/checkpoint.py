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
import math
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from omnifast.durable import fsync_path

STEP_HOOK: Optional[Callable[[str], None]] = None  # tests inject failures at each write step


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back as written: missing, truncated or tampered."""


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def write_checkpoint(final: Path, tensor_files: Dict[str, Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]],
                     json_files: Dict[str, object]) -> None:
    """Write ``final`` durably: every file (safetensors: tensors and metadata; JSON) into
    ``final.tmp`` and fsynced, the directory fsynced, renamed, the parent fsynced."""
    from safetensors.torch import save_file
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints under ``root``; also remove what an
    interrupted write (``.tmp``) or removal (``.deleting``) left there. Call it only after a
    write has finished, so that no ``.tmp`` in ``root`` is still being written."""
    for old in complete_checkpoints(root)[:-keep]:
        retire(old)
    for leftover in root.glob("step-*"):
        if leftover.name.endswith(LEFTOVER_SUFFIXES):
            shutil.rmtree(leftover, ignore_errors=True)


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own types for truncated or forged headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error


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
    return tensors, {"python": [version, list(words), gauss], "numpy": [kind, int(position), int(has_gauss),
                                                                       float(cached)],
                     "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def set_rng_state(tensors: Dict[str, torch.Tensor], values: Dict[str, object], where: Path) -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        if torch.cuda.is_available() and values["cuda_devices"]:
            if values["cuda_devices"] != torch.cuda.device_count():
                raise CheckpointError(f"{where}: saved with {values['cuda_devices']} CUDA devices, this process sees "
                                      f"{torch.cuda.device_count()}")
            torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(values["cuda_devices"])])
        version, words, gauss = values["python"]
        random.setstate((version, tuple(words), gauss))
        kind, position, has_gauss, cached = values["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: random generator state unreadable ({type(error).__name__}: {error})") from error


# --- a checkpoint read back for one run, checked against it ------------------------------------------

@dataclass
class RunSpec:
    """What a checkpoint must fit: the trainable parameters' names, shapes and dtypes, the
    optimizer's groups, the step range, the processes, and the fingerprint of the options and
    data that shape the run (``allow_changes`` accepts a changed fingerprint)."""
    parameters: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
    groups: List[Dict[str, object]]      # per group: name, params (names), initial_lr, weight_decay, betas, eps
    total_steps: int
    world: int
    rank: int
    fingerprint: Dict[str, object]
    allow_changes: bool = False


@dataclass
class RunState:
    step: int
    weights: Dict[str, torch.Tensor]
    optimizer: Dict
    scheduler: Dict
    rng_tensors: Dict[str, torch.Tensor]
    rng_values: Dict[str, object]
    references: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    changed: List[str] = field(default_factory=list)


def fingerprint_changes(saved: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """What differs between two run fingerprints, one phrase per difference."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            if key == "data":
                changes.append("the data (records or the media files they name) changed")
            else:
                changes.append(f"{key} changed from {saved.get(key)!r} to {current.get(key)!r}")
    return changes


def _check_tensor(where: Path, name: str, value: torch.Tensor, shape, dtype) -> None:
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)}, the run's is {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise CheckpointError(f"{where}: {name} has dtype {value.dtype}, the run's is {dtype}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointError(f"{where}: {name} holds NaN or infinite values")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run_state(found: Path, spec: RunSpec) -> RunState:
    """Every file of checkpoint ``found`` read (nothing unpickled) and checked against ``spec``
    before anything is copied into the run: the step an integer in [0, total steps]; exactly the
    trainable tensors, each of its parameter's shape and dtype, finite; the optimizer's moments of
    their parameters' shapes, finite, and its hyperparameters the run's; the same processes; and
    the same options and data, unless ``spec.allow_changes``. Raises :class:`CheckpointError`
    naming the file and what does not fit."""
    state_path = found / "state.json"
    state = read_json(state_path)
    weights = read_tensors(found / "trainable.safetensors")
    optimizer_tensors = read_tensors(found / "optimizer.safetensors")
    rng = read_tensors(found / "rng.safetensors")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: not a JSON object")
    for key in ("step", "world", "optimizer", "scheduler", "rng"):
        if key not in state:
            raise CheckpointError(f"{state_path}: has no {key!r}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= spec.total_steps:
        raise CheckpointError(f"{state_path}: step must be an integer in [0, {spec.total_steps}] (this run's steps), "
                              f"got {step!r}")
    if state["world"] != spec.world:
        raise CheckpointError(f"{state_path}: written by {state['world']} processes, resumed by {spec.world}")
    changed = fingerprint_changes(state.get("fingerprint") or {}, spec.fingerprint)
    if changed and not spec.allow_changes:
        raise CheckpointError(f"{found}: this run differs from the one that wrote the checkpoint: "
                              + "; ".join(changed) + ". Resume with the same options and data, or pass "
                              "--allow-changed-run to continue under the new ones")
    where = found / "trainable.safetensors"
    if set(weights) != set(spec.parameters):
        missing, extra = sorted(set(spec.parameters) - set(weights)), sorted(set(weights) - set(spec.parameters))
        raise CheckpointError(f"{where}: does not hold exactly this run's trainable tensors (missing: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; unexpected: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''})")
    for name, (shape, dtype) in spec.parameters.items():
        _check_tensor(where, name, weights[name], shape, dtype)
    where = found / "optimizer.safetensors"
    try:
        optimizer = join_tensors(state["optimizer"], optimizer_tensors, where)
        scheduler = join_tensors(state["scheduler"], optimizer_tensors, where)
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{state_path}: optimizer or scheduler state unreadable ({error})") from error
    _check_optimizer(where, optimizer, spec, step, bool(changed and spec.allow_changes))
    _check_scheduler(state_path, scheduler, spec, step, bool(changed and spec.allow_changes))
    if not isinstance(state["rng"], list) or len(state["rng"]) != spec.world:
        raise CheckpointError(f"{state_path}: holds no random generator state for each of {spec.world} processes")
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{spec.rank}.")}
    references = {}
    if (found / "reference.safetensors").is_file():
        from omnifast.ops.dpo_reference import load_reference_file
        try:
            references = load_reference_file(found / "reference.safetensors")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        if not all(_finite_number(v) for pair in references.values() for v in pair):
            raise CheckpointError(f"{found / 'reference.safetensors'}: holds NaN or infinite log-likelihoods")
    return RunState(step, weights, optimizer, scheduler, mine, state["rng"][spec.rank], references, changed)


def _check_optimizer(where: Path, optimizer, spec: RunSpec, step: int, apply_new: bool) -> None:
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{where}: not an optimizer state (state and param_groups)")
    for name, moments in optimizer["state"].items():
        if name not in spec.parameters or not isinstance(moments, dict):
            raise CheckpointError(f"{where}: optimizer state for {name!r}, which is not a trainable parameter")
        shape, _ = spec.parameters[name]
        for key, value in moments.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{where}: optimizer state {name}.{key} is not a tensor")
            _check_tensor(where, f"optimizer state {name}.{key}", value, () if key == "step" else shape, None)
            if key == "step" and not 0 <= float(value) <= step:
                raise CheckpointError(f"{where}: optimizer state {name}.step is {float(value):g}, past the "
                                      f"checkpoint's step {step}")
    saved_groups = optimizer["param_groups"]
    if len(saved_groups) != len(spec.groups):
        raise CheckpointError(f"{where}: {len(saved_groups)} parameter groups, the run has {len(spec.groups)}")
    for saved, expected in zip(saved_groups, spec.groups):
        if not isinstance(saved, dict) or saved.get("name") != expected["name"] \
                or list(saved.get("params", [])) != list(expected["params"]):
            raise CheckpointError(f"{where}: parameter group {expected['name']!r} does not hold this run's parameters")
        for key in ("initial_lr", "weight_decay", "betas", "eps", "lr"):
            if key == "betas":
                ok = isinstance(saved.get(key), (list, tuple)) and all(_finite_number(b) for b in saved[key])
            else:
                ok = _finite_number(saved.get(key))
            if not ok:
                raise CheckpointError(f"{where}: parameter group {expected['name']!r}: {key} is not a finite number")
        for key in ("initial_lr", "weight_decay", "betas", "eps"):
            value = tuple(saved[key]) if key == "betas" else saved[key]
            if value != expected[key]:
                if not apply_new:
                    raise CheckpointError(f"{where}: parameter group {expected['name']!r} has {key} {value!r}, the "
                                          f"run's is {expected[key]!r}")
                saved[key] = expected[key]
        if apply_new:  # the new options' lr at the checkpoint's step
            saved["lr"] = expected["lr_at"](step)
        elif not math.isclose(saved["lr"], expected["lr_at"](step), rel_tol=1e-9, abs_tol=1e-300):
            raise CheckpointError(f"{where}: parameter group {expected['name']!r} has lr {saved['lr']!r}, not the "
                                  f"schedule's {expected['lr_at'](step)!r} at step {step}")


def _check_scheduler(where: Path, scheduler, spec: RunSpec, step: int, apply_new: bool) -> None:
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step:
        raise CheckpointError(f"{where}: the scheduler's step is not the checkpoint's step {step}")
    initial = [group["initial_lr"] for group in spec.groups]
    if apply_new:
        scheduler["base_lrs"] = initial
        scheduler["_last_lr"] = [group["lr_at"](step) for group in spec.groups]
    elif scheduler.get("base_lrs") != initial:
        raise CheckpointError(f"{where}: the scheduler's base learning rates {scheduler.get('base_lrs')!r} are not "
                              f"the run's {initial!r}")
