"""The text-guided module of OpenOmni's speech generator (its ``RLSIAT``): the decoder's embeddings
of the response text attend to the LLM's hidden states of the same response (expanded by the MoE),
so the speech decoder sees both what is said and how the LLM meant it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention without biases (queries and context normalised
    separately), through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_context = nn.LayerNorm(width)
        self.norm_query = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """queries (B, Nq, D), context (B, Nk, D), mask (B, Nq, Nk) bool (True: may attend)."""
        B, Nq, _ = queries.shape
        q = self.to_q(self.norm_query(queries))
        k, v = self.to_kv(self.norm_context(context)).chunk(2, dim=-1)
        q, k, v = (t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.to_out(out.transpose(1, 2).reshape(B, Nq, -1))


def feed_forward(width: int, mult: int) -> nn.Sequential:
    """Pre-norm feed-forward without biases: LayerNorm -> Linear -> GELU -> Linear."""
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, width * mult, bias=False),
        nn.GELU(),
        nn.Linear(width * mult, width, bias=False),
    )


class TextGuidedLayer(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn = CrossAttention(width, heads, head_dim)
        self.ff = feed_forward(width, ff_mult)

    def forward(self, queries, context, mask):
        queries = queries + self.attn(queries, context, mask)
        return queries + self.ff(queries)


class TextGuidedModule(nn.Module):
    """``depth`` layers of (cross-attention + feed-forward), each residual, then a LayerNorm.

    ``forward(queries, context, context_mask=None, causal_groups=None)``: queries (B, Nq, D) are
    the decoder's embeddings of the response text, context (B, Nk, D) the MoE-expanded LLM
    states; ``context_mask`` (B, Nk) bool marks real context positions. With ``causal_groups``
    (B, Nk) int, query i sees only context positions whose group is <= i (each expanded LLM
    state carries the index of its text token), which makes the module streamable.
    OpenOmni's defaults: depth 2, 16 heads of 256, ff mult 4."""

    def __init__(self, width: int, depth: int = 2, heads: int = 16, head_dim: int = 256, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(TextGuidedLayer(width, heads, head_dim, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor] = None,
        causal_groups: Optional[torch.Tensor] = None,
        query_offset: int = 0,
    ) -> torch.Tensor:
        mask = None
        if context_mask is not None:
            mask = context_mask[:, None, :].expand(-1, queries.shape[1], -1)
        if causal_groups is not None:
            query_index = torch.arange(queries.shape[1], device=queries.device) + query_offset
            visible = causal_groups[:, None, :] <= query_index[None, :, None]
            mask = visible if mask is None else mask & visible
        if mask is not None:  # a query with nothing to see attends to everything, not to NaN
            mask = mask | ~mask.any(-1, keepdim=True)
        for layer in self.layers:
            queries = layer(queries, context, mask)
        return self.norm(queries)
