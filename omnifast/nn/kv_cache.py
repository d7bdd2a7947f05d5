"""A transformers decoder run with a KV cache, whatever the installed version calls it."""
from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn


@lru_cache(maxsize=None)
def _cache_keyword(module_type: type) -> str:
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


def forward_with_cache(module: nn.Module, cache, **inputs):
    """``module(**inputs, use_cache=True)`` with ``cache`` (a ``transformers`` ``Cache``, updated in
    place) passed as ``cache``, the name from transformers 5.25 on, or as ``past_key_values``
    where the module's ``forward`` has no ``cache`` parameter (older versions; the old name
    still works from 5.25 to 5.39, with a deprecation warning on every call)."""
    return module(**inputs, **{_cache_keyword(type(module)): cache}, use_cache=True)
