"""The frozen reference of CTC-DPO: its log-likelihoods of chosen and rejected units computed in
one pass without a gradient. Training keeps them by example id (``training/references.py``) so
that it computes them once."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._ctc_engine import Scorer, make_target_set
from ._dispatch import choose_backend
from ._precision import accumulation_dtype, autocast_off, cast_all, matmul_dtype
from .checks import check_int, check_linear_head, ctc_targets


def _normalise(ll, lengths, length_normalize):
    return ll / lengths.clamp(min=1).to(ll.dtype) if length_normalize else ll


@torch.no_grad()
def reference_logps(
    hidden,
    weight,
    bias,
    chosen,
    rejected,
    input_lengths,
    chosen_lengths,
    rejected_lengths,
    *,
    length_normalize: bool = False,
    blank: Optional[int] = None,
    chunk_frames: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's log-likelihoods of chosen and rejected, (B,) each, in one pass
    over the reference head's logits (no grad)."""
    check_linear_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    blank = V - 1 if blank is None else check_int("blank", blank)
    sets, in_len = [], None
    for prefix, targets, lengths in (("chosen", chosen, chosen_lengths), ("rejected", rejected, rejected_lengths)):
        padded, in_len, lengths = ctc_targets(
            targets,
            input_lengths,
            lengths,
            blank,
            T=T,
            B=B,
            C=V,
            device=hidden.device,
            name="hidden",
            targets_name=prefix,
            lengths_name=f"{prefix}_lengths",
        )
        sets.append(make_target_set(padded, lengths, blank))
    if B == 0:  # an empty batch: empty log-likelihoods
        empty = hidden.new_zeros(0, dtype=accumulation_dtype(hidden.dtype))
        return empty, empty.clone()
    device = hidden.device.type
    hidden, weight, bias = cast_all(matmul_dtype(device, hidden, weight, bias), (hidden, weight, bias))
    with autocast_off(device):
        scorer = Scorer(hidden, weight, bias, in_len, sets, blank, chunk_frames, choose_backend(hidden.device, backend))
        ll_w, ll_l = scorer.log_likelihoods(want_occupancy=False)
    return (_normalise(ll_w, sets[0].lengths, length_normalize), _normalise(ll_l, sets[1].lengths, length_normalize))
