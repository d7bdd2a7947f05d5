"""Random CTC problems for the tests: hypothesis strategies and a few hand-made edge cases."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from hypothesis import strategies as st


@dataclass
class Problem:
    logits: torch.Tensor  # (T, B, C)
    targets: torch.Tensor  # padded (B, S)
    input_lengths: torch.Tensor  # (B,)
    target_lengths: torch.Tensor  # (B,)
    blank: int

    def with_dtype(self, dtype: torch.dtype) -> "Problem":
        return replace(self, logits=self.logits.to(dtype))

    def concatenated_targets(self) -> torch.Tensor:
        return torch.cat([row[:n] for row, n in zip(self.targets, self.target_lengths.tolist())])


def make_problem(
    T: int,
    B: int,
    C: int,
    blank: int,
    target_lengths,
    input_lengths=None,
    seed: int = 0,
    repeated: bool = False,
    dtype=torch.float64,
    width: Optional[int] = None,
    scale: float = 2.0,
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    target_lengths = torch.tensor(target_lengths, dtype=torch.long)
    width = max(int(target_lengths.max()) if B else 0, width or 0)
    labels = torch.randint(0, C - 1, (B, width), generator=gen)
    labels = labels + (labels >= blank).long()  # never the blank
    if repeated:
        labels = labels[:, :1].expand(B, width).clone()
    # Garbage beyond each target length must be ignored.
    pad = torch.arange(width) >= target_lengths[:, None]
    labels = torch.where(pad, torch.randint(-5, C + 5, (B, width), generator=gen), labels)
    if input_lengths is None:
        input_lengths = [T] * B
    logits = torch.randn(T, B, C, generator=gen, dtype=torch.float64) * scale
    return Problem(logits.to(dtype), labels, torch.tensor(input_lengths, dtype=torch.long), target_lengths, blank)


@st.composite
def problems(draw, max_T: int = 14, max_B: int = 4, max_C: int = 9, max_L: int = 6, feasible: bool = False):
    T = draw(st.integers(1, max_T))
    B = draw(st.integers(1, max_B))
    C = draw(st.integers(2, max_C))
    blank = draw(st.sampled_from([0, C - 1, draw(st.integers(0, C - 1))]))
    input_lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    if feasible:  # L + repeats <= input length holds when 2L <= input length
        target_lengths = [draw(st.integers(0, min(max_L, n // 2))) for n in input_lengths]
    else:
        target_lengths = draw(st.lists(st.integers(0, max_L), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    repeated = draw(st.booleans())
    return make_problem(T, B, C, blank, target_lengths, input_lengths, seed, repeated=repeated and C > 2)
