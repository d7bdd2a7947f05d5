"""The frozen reference's log-likelihoods of (chosen, rejected), kept by example id so that
CTC-DPO training computes them once (optionally in a safetensors file)."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save

from omnifast.durable import write_durably
from omnifast.ops import reference_logps


class ReferenceLogpCache:
    """Reference log-likelihoods of (chosen, rejected) keyed by example id: the one place the
    frozen reference's values live. ``build`` runs a reference over the data once; later epochs
    ``lookup`` the values. ``path`` (optional) is a safetensors file, read without running code
    and written durably (temporary file, fsync, rename), so a crash never leaves a torn cache."""

    def __init__(self, path: Optional[str] = None):
        self.path = None if path is None else str(path)
        self.values: Dict[str, Tuple[float, float]] = {}
        if self.path is not None and os.path.exists(self.path):
            self.update_from(load_reference_file(self.path))

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, key) -> bool:
        return str(key) in self.values

    def add(self, ids: Sequence, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for key, w, l in zip(ids, chosen.tolist(), rejected.tolist()):
            self.values[str(key)] = (w, l)

    def update_from(self, values: Dict[str, Tuple[float, float]]) -> None:
        for key, pair in values.items():
            if len(pair) != 2 or not all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in pair):
                raise ValueError(f"reference log-likelihoods of {key!r} must be two finite numbers, got {pair!r}")
            self.values[str(key)] = (float(pair[0]), float(pair[1]))

    def lookup(self, ids: Sequence, device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ids if str(key) not in self.values]
        if missing:
            raise KeyError(f"no reference log-likelihoods cached for ids {missing[:5]} (of {len(missing)})")
        pairs = torch.tensor([self.values[str(key)] for key in ids], dtype=dtype, device=device)
        return pairs[:, 0], pairs[:, 1]

    def tensors(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """(tensors, metadata) of a safetensors file holding the values."""
        ids = list(self.values)
        pairs = torch.tensor([self.values[k] for k in ids], dtype=torch.float64).reshape(-1, 2)
        return {"chosen": pairs[:, 0].contiguous(), "rejected": pairs[:, 1].contiguous()}, {"ids": json.dumps(ids)}

    def save(self, path: Optional[str] = None) -> None:
        target = path or self.path
        if target is None:
            raise ValueError("this ReferenceLogpCache has no path to save to")
        tensors, metadata = self.tensors()
        write_durably(target, lambda handle: handle.write(save(tensors, metadata)))

    @classmethod
    def build(cls, path: str, batches: Iterable[dict], weight, bias, **options) -> "ReferenceLogpCache":
        """``batches`` yield dicts with ``ids``, ``hidden`` (the frozen reference decoder's
        states), ``chosen``, ``rejected``, ``input_lengths``, ``chosen_lengths`` and
        ``rejected_lengths``; ``options`` go to :func:`reference_logps`. Already cached ids are
        skipped; the file is saved at the end."""
        cache = cls(path)
        for batch in batches:
            if all(str(key) in cache.values for key in batch["ids"]):
                continue
            w, l = reference_logps(
                batch["hidden"],
                weight,
                bias,
                batch["chosen"],
                batch["rejected"],
                batch["input_lengths"],
                batch["chosen_lengths"],
                batch["rejected_lengths"],
                **options,
            )
            cache.add(batch["ids"], w, l)
        cache.save()
        return cache


def load_reference_file(path) -> Dict[str, Tuple[float, float]]:
    """The values of a file written by :meth:`ReferenceLogpCache.save` (ValueError if it is not one)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            ids = json.loads((handle.metadata() or {})["ids"])
            chosen, rejected = handle.get_tensor("chosen").tolist(), handle.get_tensor("rejected").tolist()
    except Exception as error:  # safetensors raises its own types for a forged or truncated file
        raise ValueError(f"{path}: not a reference log-likelihood file ({type(error).__name__}: {error})") from None
    if not (isinstance(ids, list) and len(ids) == len(chosen) == len(rejected)):
        raise ValueError(f"{path}: its ids and values do not match")
    return {str(k): (w, l) for k, w, l in zip(ids, chosen, rejected)}
