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
    place) passed as ``cache`` where the module's ``forward`` takes that name (transformers 5.24
    and 5.25 do), else as ``past_key_values`` (5.17 does). 5.25 warns on every call that uses
    the old name where the new one exists, and 5.40 drops it."""
    return module(**inputs, **{_cache_keyword(type(module)): cache}, use_cache=True)
