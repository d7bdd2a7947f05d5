"""The learning-rate schedule of every optimiser in omnifast: a linear warmup and a cosine decay to
0, as a factor of the base rate for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from typing import Callable

from omnifast.ops.checks import check_int


def warmup_cosine(total: int, warmup: int, *, decay_from_start: bool = False) -> Callable[[int], float]:
    """The lr factor of step ``s`` (0-based) of ``total``: ``min(1, (s + 1) / (warmup + 1))``
    times a cosine that falls from 1 to 0, over the steps after the warmup or, with
    ``decay_from_start``, over all ``total`` steps (the ramp then multiplies the early decay)."""
    for name, value in (("total", total), ("warmup", warmup)):
        if check_int(name, value) < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    decay_start = 0 if decay_from_start else warmup

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / (warmup + 1))
        if step < decay_start:
            return ramp
        return ramp * 0.5 * (1 + math.cos(math.pi * (step - decay_start) / max(1, total - decay_start)))

    return factor
