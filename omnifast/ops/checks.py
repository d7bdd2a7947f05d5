"""Argument validation for the public ops.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
value) naming the argument, and runs before any kernel. The CTC checks also bring the
arguments into the one canonical form every backend takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

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
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values")
    return value


def check_same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{name} is on {value.device} but {other_name} is on {other.device}")


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


def check_number(
    name: str, value, *, low: Optional[float] = None, high: Optional[float] = None, positive: bool = False
) -> float:
    """A finite real number (not a bool) in range: TypeError or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be a number >= {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be a number <= {high:g}, got {value!r}")
    return value


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
    out_of_range = [v for v in items if not 0 <= v < 2**63]
    if out_of_range:
        raise ValueError(f"{name} must be in [0, 2**63), got {out_of_range[0]!r}")
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
        targets,
        input_lengths,
        target_lengths,
        blank,
        T=T,
        B=B,
        C=C,
        device=inputs.device,
        unbatched=unbatched,
        name=name,
    )
    return CTCArgs(inputs, targets, input_lengths, target_lengths, blank, unbatched)


def ctc_targets(
    targets,
    input_lengths,
    target_lengths,
    blank: int,
    *,
    T: int,
    B: int,
    C: int,
    device: torch.device,
    unbatched: bool = False,
    name: str = "log_probs",
    targets_name: str = "targets",
    lengths_name: str = "target_lengths",
):
    """Validate CTC targets and lengths against T frames, B sequences and C classes; return
    padded (B, S) int64 targets (padding replaced by ``blank``) and (B,) int64 lengths.

    Every statistic the checks need is gathered into one tensor and read back at once: on a
    GPU the validation costs one host sync, whatever the form of the targets."""
    check_tensor(targets_name, targets, integer=True)
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, {C}) for {C} classes, got {blank}")
    input_lengths = _lengths("input_lengths", input_lengths, device).reshape(-1)
    target_lengths = _lengths(lengths_name, target_lengths, device).reshape(-1)
    for arg, lengths in (("input_lengths", input_lengths), (lengths_name, target_lengths)):
        if lengths.numel() != B:
            raise ValueError(f"{arg} must have one entry per sequence ({B}), got {lengths.numel()}")
    targets = targets.to(device=device, dtype=torch.long)
    if unbatched and targets.dim() == 1:
        targets = targets.unsqueeze(0)
    if targets.dim() not in (1, 2):
        raise ValueError(f"{targets_name} must be padded (B, S) or concatenated 1-D, got shape {tuple(targets.shape)}")
    if targets.dim() == 2 and targets.shape[0] != B:
        raise ValueError(f"{targets_name} has batch size {targets.shape[0]} but {name} has {B}")
    if B == 0:
        return targets.new_zeros(0, targets.shape[1] if targets.dim() == 2 else 0), input_lengths, target_lengths

    padded = targets.dim() == 2
    if padded:
        valid = torch.arange(targets.shape[1], device=device) < target_lengths[:, None]
        values, count = targets, valid.sum()
    else:
        valid, values, count = None, targets, torch.tensor(targets.numel(), device=device)
    low_of, high_of = values, values
    if valid is not None:  # only the entries inside each target length count
        low_of, high_of = torch.where(valid, values, torch.iinfo(torch.long).max), torch.where(valid, values, -1)
        has_blank = valid & (values == blank)
    else:
        has_blank = values == blank
    empty = values.numel() == 0
    low = torch.tensor(0, device=device) if empty else low_of.amin()
    high = torch.tensor(0, device=device) if empty else high_of.amax()
    stats = torch.stack(
        [
            input_lengths.min(),
            input_lengths.max(),
            target_lengths.min(),
            target_lengths.max(),
            target_lengths.sum(),
            count,
            low,
            high,
            has_blank.any().long(),
        ]
    ).tolist()
    in_min, in_max, tgt_min, tgt_max, total, count, low, high, has_blank = stats

    for arg, lengths, smallest in (("input_lengths", input_lengths, in_min), (lengths_name, target_lengths, tgt_min)):
        if smallest < 0:
            raise ValueError(f"{arg} must not be negative, got {lengths.tolist()}")
    if in_max > T:
        raise ValueError(f"input_lengths must be at most T={T}, got max {in_max}")
    if padded and tgt_max > targets.shape[1]:
        raise ValueError(
            f"{lengths_name} must be at most the padded target width {targets.shape[1]}, got max {tgt_max}"
        )
    if not padded and count != total:
        raise ValueError(
            f"1-D (concatenated) {targets_name} must have sum({lengths_name})={total} entries, got {count}"
        )
    if count and (low < 0 or high >= C):
        raise ValueError(f"{targets_name} must lie in [0, {C}), got values from {low} to {high}")
    if has_blank:
        raise ValueError(f"{targets_name} must not contain the blank index {blank}")
    if padded:  # padding beyond each length may hold anything: make it a harmless in-range value
        return torch.where(valid, targets, blank).contiguous(), input_lengths.contiguous(), target_lengths.contiguous()
    # concatenated -> padded by a gather (no boolean indexing, which would sync again)
    width = tgt_max
    starts = torch.cumsum(target_lengths, 0) - target_lengths
    valid = torch.arange(width, device=device) < target_lengths[:, None]
    index = (starts[:, None] + torch.arange(width, device=device)).clamp(max=max(targets.numel() - 1, 0))
    gathered = targets[index] if targets.numel() else torch.zeros_like(index)
    return torch.where(valid, gathered, blank).contiguous(), input_lengths.contiguous(), target_lengths.contiguous()


def check_linear_head(hidden, weight, bias) -> None:
    """A linear head over frames: ``hidden`` (B, T >= 1, D), ``weight`` (V, D), ``bias`` (V,) or
    None, floating point, on one device."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D) batch-first, got shape {tuple(hidden.shape)}")
    if hidden.shape[1] == 0:
        raise ValueError("hidden needs at least one frame (T >= 1)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be (V, D) with D = hidden width {hidden.shape[2]}, got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},) like weight's rows, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def check_chunk_frames(chunk_frames) -> None:
    """``chunk_frames``: None (chosen by the op) or an int >= 1."""
    if chunk_frames is not None and check_int("chunk_frames", chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
