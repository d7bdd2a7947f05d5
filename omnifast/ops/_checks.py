"""Argument validation for the public ops.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
value) naming the argument, and runs before any kernel. The CTC checks also bring the
arguments into the one canonical form every backend takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")
Lengths = Union[torch.Tensor, Sequence[int], int]


def check_tensor(name: str, value, *, floating: bool = False, integer: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {value.dtype}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_known_keys(what: str, values, cls) -> None:
    """A ValueError naming the keys of ``values`` that are not fields of the dataclass ``cls``."""
    from dataclasses import fields
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _lengths(name: str, value: Lengths, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, integer=True)
        return value.to(device=device, dtype=torch.long)
    items = [value] if isinstance(value, int) else value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be a tensor or a sequence of ints, got {value!r}")
    return torch.tensor(items, dtype=torch.long, device=device)


@dataclass
class CTCArgs:
    """Canonical CTC arguments: ``inputs`` (T, B, C); ``targets`` padded (B, S) int64;
    ``input_lengths`` and ``target_lengths`` (B,) int64, all on the inputs' device."""

    inputs: torch.Tensor
    targets: torch.Tensor
    input_lengths: torch.Tensor
    target_lengths: torch.Tensor
    blank: int
    unbatched: bool


def ctc_args(inputs, targets, input_lengths, target_lengths, blank, *, name: str = "log_probs") -> CTCArgs:
    """Validate the arguments of a CTC op (the forms ``F.ctc_loss`` accepts) and return them
    in canonical form. Target values are checked only inside ``target_lengths``."""
    check_tensor(name, inputs, floating=True)
    check_tensor("targets", targets, integer=True)
    check_int("blank", blank)
    if inputs.dim() not in (2, 3):
        raise ValueError(f"{name} must be (T, B, C) or unbatched (T, C), got shape {tuple(inputs.shape)}")
    unbatched = inputs.dim() == 2
    if unbatched:
        inputs = inputs.unsqueeze(1)
    T, B, C = inputs.shape
    if T == 0 or C == 0:
        raise ValueError(f"{name} needs at least one time step and one class, got shape {tuple(inputs.shape)}")

    targets, input_lengths, target_lengths = ctc_targets(
        targets, input_lengths, target_lengths, blank, T=T, B=B, C=C, device=inputs.device,
        unbatched=unbatched, name=name)
    return CTCArgs(inputs, targets, input_lengths, target_lengths, blank, unbatched)


def ctc_targets(targets, input_lengths, target_lengths, blank: int, *, T: int, B: int, C: int,
                device: torch.device, unbatched: bool = False, name: str = "log_probs",
                targets_name: str = "targets", lengths_name: str = "target_lengths"):
    """Validate CTC targets and lengths against T frames, B sequences and C classes; return
    padded (B, S) int64 targets (padding replaced by ``blank``) and (B,) int64 lengths."""
    check_tensor(targets_name, targets, integer=True)
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, {C}) for {C} classes, got {blank}")
    input_lengths = _lengths("input_lengths", input_lengths, device).reshape(-1)
    target_lengths = _lengths(lengths_name, target_lengths, device).reshape(-1)
    for arg, lengths in (("input_lengths", input_lengths), (lengths_name, target_lengths)):
        if lengths.numel() != B:
            raise ValueError(f"{arg} must have one entry per sequence ({B}), got {lengths.numel()}")
        if B and int(lengths.min()) < 0:
            raise ValueError(f"{arg} must not be negative, got {lengths.tolist()}")
    if B and int(input_lengths.max()) > T:
        raise ValueError(f"input_lengths must be at most T={T}, got max {int(input_lengths.max())}")

    targets = targets.to(device=device, dtype=torch.long)
    if unbatched and targets.dim() == 1:
        targets = targets.unsqueeze(0)
    if targets.dim() == 2:
        if targets.shape[0] != B:
            raise ValueError(f"{targets_name} has batch size {targets.shape[0]} but {name} has {B}")
        if B and int(target_lengths.max()) > targets.shape[1]:
            raise ValueError(
                f"{lengths_name} must be at most the padded target width {targets.shape[1]}, "
                f"got max {int(target_lengths.max())}")
        width = targets.shape[1]
        valid = torch.arange(width, device=device) < target_lengths[:, None]
        values = targets[valid]
    elif targets.dim() == 1:
        total = int(target_lengths.sum())
        if targets.numel() != total:
            raise ValueError(f"1-D (concatenated) {targets_name} must have sum({lengths_name})={total} entries, "
                             f"got {targets.numel()}")
        width = int(target_lengths.max()) if B else 0
        valid = torch.arange(width, device=device) < target_lengths[:, None]
        values = targets
        padded = torch.full((B, width), blank, dtype=torch.long, device=device)
        padded[valid] = targets
        targets = padded
    else:
        raise ValueError(f"{targets_name} must be padded (B, S) or concatenated 1-D, got shape {tuple(targets.shape)}")
    if values.numel():
        if int(values.min()) < 0 or int(values.max()) >= C:
            raise ValueError(f"{targets_name} must lie in [0, {C}), got values from {int(values.min())} to {int(values.max())}")
        if bool((values == blank).any()):
            raise ValueError(f"{targets_name} must not contain the blank index {blank}")
    # Padding beyond each length may hold anything: make it a harmless in-range value.
    targets = torch.where(valid, targets[:, :width], blank).contiguous()
    return targets, input_lengths.contiguous(), target_lengths.contiguous()
