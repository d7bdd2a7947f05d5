"""Decoding of CTC emissions."""

from __future__ import annotations

from typing import List, Optional

import torch

from .checks import Lengths, _lengths, check_bool, check_int, check_number, check_tensor


def ctc_greedy_decode(
    log_probs_or_logits: torch.Tensor, lengths: Optional[Lengths] = None, blank: int = 0, *, time_major: bool = False
) -> List[List[int]]:
    """Best-path CTC decoding: the argmax class of every frame, repeats collapsed, blanks dropped.

    ``log_probs_or_logits``: (B, T, C), or (T, B, C) with ``time_major=True``, or (T, C) for one
    sequence (log_softmax does not change the argmax, so either works). ``lengths`` (B,): valid
    frames per sequence (default: all T). Returns one list of class ids per sequence."""
    check_tensor("log_probs_or_logits", log_probs_or_logits, floating=True)
    check_int("blank", blank)
    check_bool("time_major", time_major)
    x = log_probs_or_logits
    if x.dim() == 2:
        x = x.unsqueeze(1 if time_major else 0)
    elif x.dim() != 3:
        raise ValueError(f"log_probs_or_logits must be (B, T, C), (T, B, C) or (T, C), got shape {tuple(x.shape)}")
    if time_major:
        x = x.transpose(0, 1)
    B, T, C = x.shape
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, {C}) (the number of classes), got {blank}")
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
    else:
        lengths = _lengths("lengths", lengths, x.device).reshape(-1)
        if lengths.numel() != B:
            raise ValueError(f"lengths must hold one length per sequence ({B}), got {lengths.numel()}")
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise ValueError(f"lengths must be in [0, {T}] (the number of frames), got {lengths.tolist()}")
    best = x.argmax(-1)
    fresh = torch.ones_like(best, dtype=torch.bool)
    fresh[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = fresh & (best != blank) & (torch.arange(T, device=x.device) < lengths[:, None])
    units, counts = best[keep].tolist(), keep.sum(1).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return [units[a:b] for a, b in zip(starts[:-1], starts[1:])]


def sample_top_k_top_p(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """Sample one class from ``logits`` (C,): softmax at ``temperature``, restricted to the
    ``top_k`` most likely classes (0: no limit) and to the smallest set whose probability
    reaches ``top_p`` (always at least the most likely class)."""
    check_tensor("logits", logits, floating=True)
    if logits.dim() != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be 1-D and non-empty, got shape {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    check_number("top_p", top_p, positive=True, high=1.0)
    check_number("temperature", temperature, positive=True)
    probs, classes = torch.softmax(logits.float() / temperature, -1).sort(descending=True, stable=True)
    keep = (probs.cumsum(0) - probs) < top_p
    if top_k:
        keep[top_k:] = False
    choice = torch.multinomial(probs * keep, 1, generator=generator)
    return int(classes[choice])
