"""A checkpoint read back for one run and checked against it before anything is restored: every
tensor's name, shape, dtype and finiteness, the optimizer's and the schedule's hyperparameters, and
a fingerprint of the run's options and data. What does not fit raises :class:`CheckpointError`
naming the file and the value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .checkpoint import CheckpointError, join_tensors, read_json, read_tensors


@dataclass
class RunSpec:
    """What a checkpoint must fit: the trainable parameters' names, shapes and dtypes, the
    optimizer's groups, the step range, the processes, and the fingerprint of the options and
    data that shape the run (``allow_changes`` accepts a changed fingerprint)."""

    parameters: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
    groups: List[Dict[str, object]]  # per group: name, params (names), initial_lr, weight_decay, betas, eps
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
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: not a JSON object")
    tie = state.get("checkpoint")
    if not isinstance(tie, str):
        raise CheckpointError(
            f"{state_path}: has no checkpoint tie (written by an older omnifast, or not a checkpoint)"
        )
    weights = read_tensors(found / "trainable.safetensors", tie)
    optimizer_tensors = read_tensors(found / "optimizer.safetensors", tie)
    rng = read_tensors(found / "rng.safetensors", tie)
    for key in ("step", "world", "optimizer", "scheduler", "rng"):
        if key not in state:
            raise CheckpointError(f"{state_path}: has no {key!r}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= spec.total_steps:
        raise CheckpointError(
            f"{state_path}: step must be an integer in [0, {spec.total_steps}] (this run's steps), got {step!r}"
        )
    if state["world"] != spec.world:
        raise CheckpointError(f"{state_path}: written by {state['world']} processes, resumed by {spec.world}")
    changed = fingerprint_changes(state.get("fingerprint") or {}, spec.fingerprint)
    if changed and not spec.allow_changes:
        raise CheckpointError(
            f"{found}: this run differs from the one that wrote the checkpoint: "
            + "; ".join(changed)
            + ". Resume with the same options and data, or pass "
            "--allow-changed-run to continue under the new ones"
        )
    where = found / "trainable.safetensors"
    if set(weights) != set(spec.parameters):
        missing, extra = sorted(set(spec.parameters) - set(weights)), sorted(set(weights) - set(spec.parameters))
        raise CheckpointError(
            f"{where}: does not hold exactly this run's trainable tensors (missing: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; unexpected: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''})"
        )
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

        read_tensors(found / "reference.safetensors", tie)
        try:
            references = load_reference_file(found / "reference.safetensors")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        if not all(_finite_number(v) for pair in references.values() for v in pair):
            raise CheckpointError(f"{found / 'reference.safetensors'}: holds NaN or infinite log-likelihoods")
    return RunState(step, weights, optimizer, scheduler, mine, state["rng"][spec.rank], references, changed)


def _check_optimizer(where: Path, optimizer, spec: RunSpec, step: int, apply_new: bool) -> None:
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), list)
    ):
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
                raise CheckpointError(
                    f"{where}: optimizer state {name}.step is {float(value):g}, past the checkpoint's step {step}"
                )
    saved_groups = optimizer["param_groups"]
    if len(saved_groups) != len(spec.groups):
        raise CheckpointError(f"{where}: {len(saved_groups)} parameter groups, the run has {len(spec.groups)}")
    for saved, expected in zip(saved_groups, spec.groups):
        if (
            not isinstance(saved, dict)
            or saved.get("name") != expected["name"]
            or list(saved.get("params", [])) != list(expected["params"])
        ):
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
                    raise CheckpointError(
                        f"{where}: parameter group {expected['name']!r} has {key} {value!r}, the "
                        f"run's is {expected[key]!r}"
                    )
                saved[key] = expected[key]
        if apply_new:  # the new options' lr at the checkpoint's step
            saved["lr"] = expected["lr_at"](step)
        elif not math.isclose(saved["lr"], expected["lr_at"](step), rel_tol=1e-9, abs_tol=1e-300):
            raise CheckpointError(
                f"{where}: parameter group {expected['name']!r} has lr {saved['lr']!r}, not the "
                f"schedule's {expected['lr_at'](step)!r} at step {step}"
            )


def _check_scheduler(where: Path, scheduler, spec: RunSpec, step: int, apply_new: bool) -> None:
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step:
        raise CheckpointError(f"{where}: the scheduler's step is not the checkpoint's step {step}")
    initial = [group["initial_lr"] for group in spec.groups]
    if apply_new:
        scheduler["base_lrs"] = initial
        scheduler["_last_lr"] = [group["lr_at"](step) for group in spec.groups]
    elif scheduler.get("base_lrs") != initial:
        raise CheckpointError(
            f"{where}: the scheduler's base learning rates {scheduler.get('base_lrs')!r} are not the run's {initial!r}"
        )
