"""Host-side helpers every kernel file shares."""

from __future__ import annotations

import torch
import triton


def block_size(n: int, cap: int) -> int:
    """A power-of-two tile covering ``n`` (at least 16, at most ``cap``)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def as_int32(*tensors: torch.Tensor):
    """Each tensor as a contiguous int32 tensor (the kernels' index type)."""
    return tuple(t.to(torch.int32).contiguous() for t in tensors)
