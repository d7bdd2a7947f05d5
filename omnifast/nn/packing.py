"""Packed sequences: the records of a micro-batch concatenated along time, each attending only
within itself, positions restarting per record, so no work is spent on padding.

A pack is described by ``cu_seqlens`` (B + 1,), the offsets of its records. ``varlen_attention``
is registered with ``transformers`` as the attention implementation ``"omnifast_varlen"``: a
model set to it and called with ``cu_seq_lens_q`` (and ``position_ids`` restarting per record,
for the rotary embedding) attends record by record: on CUDA through
``torch.nn.attention.varlen.varlen_attn`` (one flash-attention launch for the whole pack) where
the build has it, otherwise one ``scaled_dot_product_attention`` per record, which is exactly the
padded batch's attention for that record.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMPLEMENTATION = "omnifast_varlen"


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B + 1,) int32 offsets."""
    return F.pad(lengths.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def positions(lengths: torch.Tensor) -> torch.Tensor:
    """(sum lengths,) positions restarting at 0 for each record."""
    lengths = lengths.long()
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum()), device=lengths.device) - starts


def pack(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) right-padded rows -> (sum lengths, ...) their real rows, in order."""
    keep = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
    return padded[keep]


def unpack(packed: torch.Tensor, lengths: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """(sum lengths, ...) -> (B, T, ...) right-padded with zeros (T = ``total`` or the longest)."""
    T = int(lengths.max()) if total is None else total
    keep = torch.arange(T, device=packed.device)[None] < lengths[:, None]
    out = packed.new_zeros((lengths.shape[0], T) + packed.shape[1:])
    out[keep] = packed
    return out


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    max_length_q: Optional[int] = None,
    packed_causal: bool = True,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers attention over a pack (query (1, heads, T, d), key/value (1, kv heads, T, d)):
    within each record of ``cu_seq_lens_q``, causal unless ``packed_causal=False``. Returns
    (1, T, heads, d)."""
    if cu_seq_lens_q is None:  # not a pack: the attention the model had before
        return _base_attention(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"a pack is one row, got a batch of {query.shape[0]}")
    causal = packed_causal
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
    if query.is_cuda and _flash_varlen() is not None and query.dtype in (torch.float16, torch.bfloat16):
        offsets = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((offsets[1:] - offsets[:-1]).max())
        return flash_varlen(_flash_varlen(), q, k, v, offsets, longest, scaling, causal)[None], None
    bounds = cu_seq_lens_q.tolist()
    pieces: List[torch.Tensor] = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:stop].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, d)
        pieces.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling, enable_gqa=groups > 1)[
                0
            ].transpose(0, 1)
        )
    return torch.cat(pieces)[None], None


def flash_varlen(varlen_attn, q, k, v, offsets, longest: int, scale: Optional[float], causal: bool) -> torch.Tensor:
    """One ``varlen_attn`` launch over a pack: q (T, heads, d), k/v (T, kv heads, d) -> (T, heads, d).
    Grouped-query attention goes to ``enable_gqa`` where ``varlen_attn`` takes it (torch >= 2.12);
    before that, k and v are repeated to the query heads."""
    groups = q.shape[1] // k.shape[1]
    options = {"scale": scale, "window_size": (-1, 0) if causal else (-1, -1)}
    if groups > 1:
        if _takes_keyword(varlen_attn, "enable_gqa"):
            options["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, offsets, offsets, longest, longest, **options)


def _takes_keyword(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume the older form
        return False


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _base_attention(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    base = getattr(module.config, "_omnifast_base_attention", "sdpa")
    return eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]


def _base_mask(*args, config=None, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[getattr(config, "_omnifast_base_attention", "sdpa")](
        *args, config=config, **kwargs
    )


def use_varlen(model) -> None:
    """Set a transformers model to ``"omnifast_varlen"`` for good: packs attend record by record,
    every other call through the implementation the model had. Set once, not per call, so that a
    layer recomputed in the backward (activation checkpointing) runs the same attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _base_mask)
    config = model.config
    if config._attn_implementation != IMPLEMENTATION:
        config._omnifast_base_attention = config._attn_implementation
        config._attn_implementation = IMPLEMENTATION


def run_packed(model, embeds: torch.Tensor, lengths: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """A transformers decoder (``Qwen2Model``) over a pack: ``embeds`` (sum lengths, D) ->
    (sum lengths, D), each record attending within itself (causally, or to all of itself),
    positions restarting per record."""
    use_varlen(model)
    offsets = cu_seqlens(lengths)
    longest = int(lengths.max())
    out = model(
        inputs_embeds=embeds[None],
        position_ids=positions(lengths)[None],
        use_cache=False,
        attention_mask={"full_attention": None},  # no mask is built: each record attends within itself
        cu_seq_lens_q=offsets,
        cu_seq_lens_k=offsets,
        max_length_q=longest,
        max_length_k=longest,
        packed_causal=causal,
    ).last_hidden_state
    return out[0]


def split_lengths(lengths: Sequence[int]) -> List[slice]:
    out, start = [], 0
    for n in lengths:
        out.append(slice(start, start + n))
        start += n
    return out
