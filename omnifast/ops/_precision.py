"""Mixed precision, the same for every op: which dtype the matmuls run in, which dtype the
recursions accumulate in, and how an op steps out of ``torch.autocast``.

The contract (DESIGN.md): bf16/fp16 inputs and ``torch.autocast`` work on every backend; the
matmuls inside an op run in the autocast dtype where autocast is on (float64 excepted, as torch's
autocast leaves it alone), else in the promoted dtype of their operands; softmax, log-sum-exp and
the CTC recursion accumulate in float32 (float64 for float64); losses come back in float32 (or
float64); gradients come back in the dtype of their leaf. An op casts its operands once, outside
its autograd Function (so autograd casts the gradients back), and runs the Function with autocast
off, so that nothing inside is cast a second time.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on this device type, or None where it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def matmul_dtype(device_type: str, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype a matmul over ``tensors`` runs in (see the module docstring)."""
    promoted = functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])
    cast = autocast_dtype(device_type)
    return cast if cast is not None and promoted != torch.float64 else promoted


def cast_all(dtype: torch.dtype, tensors: Sequence[Optional[torch.Tensor]]):
    """Each tensor in ``dtype`` (a differentiable cast; None stays None)."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False)


def scale_gradients(grads, grad_output: torch.Tensor):
    """Gradients computed for a unit upstream gradient, times the real one. On the CPU a
    gradient of 1 skips the multiply; on a GPU the value is not read back (a host sync), the
    multiply always runs."""
    if grad_output.device.type == "cpu" and bool(grad_output == 1):
        return tuple(grads)
    return tuple(None if g is None else g * grad_output.to(g.dtype) for g in grads)
