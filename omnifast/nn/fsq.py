"""``FSQ``: finite scalar quantisation as a module (no parameters) over ``omnifast.ops.fsq``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from omnifast.ops.fsq import check_levels, fsq_codes_to_indices, fsq_indices_to_codes, fsq_quantize


class FSQ(nn.Module):
    """``FSQ(levels)``: z (..., D) -> (codes in [-1, 1] with a straight-through gradient, unit
    indices in [0, prod(levels))). EMOVA's tokenizer uses levels [8, 8, 8, 8] (4096 units)."""

    def __init__(self, levels: Sequence[int] = (8, 8, 8, 8), backend: Optional[str] = None):
        super().__init__()
        self.levels, self.backend = check_levels(levels), backend
        self.codebook_size = 1
        for level in self.levels:
            self.codebook_size *= level

    def forward(self, z: torch.Tensor):
        return fsq_quantize(z, self.levels, self.backend)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return fsq_indices_to_codes(indices, self.levels)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return fsq_codes_to_indices(codes, self.levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"
