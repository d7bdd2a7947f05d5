"""OpenOmni's speech generator on omnifast's kernels: the front end both decoders share.

LLM hidden states of the response -> [sos | states | task] -> dense MoE (4 experts, each state
split into 4 tokens of the decoder width) -> text-guided module (the decoder's embeddings of the
response text attend to them) -> a ``transformers`` Qwen2 decoder (``Qwen2Model`` fed
``inputs_embeds``), and then either

* ``CTCSpeechDecoder`` (``mode="nar"``, ``omnifast/nn/ctc_decoder.py``): each text position
  upsampled ``upsample_factor`` times, a CTC head over V units + blank trained with the fused
  linear-CTC (the (B, T, V) logits never exist) or CTC-DPO, streamed with a KV cache; or
* ``ARSpeechDecoder`` (``mode="ar"``, ``omnifast/nn/ar_decoder.py``): next-unit prediction over
  [sos | fused text | task | units] with a chunked fused linear cross-entropy, its DPO on the
  same, sampled with a KV cache.

``build_speech_decoder(config, mode)`` (``decoders.py``) builds the one the mode names.
OpenOmni's checkpoints load through ``omnifast/openomni``.

``SpeechDecoderConfig.openomni()`` computes exactly what OpenOmni's ``SpeechGeneratorCTC`` does
(its text-guided attention sees every LLM state; its upsampling rounds in floating point). The
defaults are omnifast's own choices where they differ: the text-guided attention is causal
(``fusion_causal``: text token i sees the LLM states of tokens <= i), which is what makes
streaming equal to one full pass, and the upsampling assignment is exact integer arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifast.constants import IGNORE_INDEX
from omnifast.ops.checks import check_choice, check_tensor

from .moe import MoE
from .packing import pack, run_packed, unpack
from .speech_decoder_config import SpeechDecoderConfig
from .text_guided import TextGuidedModule

__all__ = ["SpeechDecoder", "SpeechDecoderConfig", "SpeechDecoderOutput", "uniform_upsample"]


@dataclass
class SpeechDecoderOutput:
    loss: Optional[torch.Tensor]  # float32 scalar when targets were given
    states: torch.Tensor  # (B, T, width) decoder outputs (frames, or AR positions)
    lengths: torch.Tensor  # (B,) valid positions of ``states``


def _prefix_lengths(name: str, mask: Optional[torch.Tensor], shape: Tuple[int, int], device) -> torch.Tensor:
    """Lengths of a right-padded mask (True = real), or full lengths when no mask is given."""
    if mask is None:
        return torch.full((shape[0],), shape[1], dtype=torch.long, device=device)
    check_tensor(name, mask)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    mask = mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(shape[1], device=device) < lengths[:, None]):
        raise ValueError(f"{name} must mark a prefix of each row (right padding)")
    return lengths


def uniform_upsample(
    x: torch.Tensor,
    lengths: torch.Tensor,
    factor: int,
    min_frames: Optional[torch.Tensor] = None,
    rounding: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Repeat each of the first ``lengths[b]`` rows of ``x`` (B, N, D) over
    ``frames = max(lengths * factor, min_frames)`` frames by uniform assignment: frame t takes row
    ``t * lengths // frames`` (``rounding="exact"``), or OpenOmni's ``(t / (frames / lengths))``
    truncated, computed in floating point (``"openomni"``: the two differ at some rounding
    boundaries when the frames outnumber factor x lengths). Frames past a row's count are zero.
    Returns (frames, frame lengths)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upsample factor must be an int >= 1, got {factor!r}")
    frames = lengths * factor
    if min_frames is not None:
        frames = torch.maximum(frames, min_frames.to(frames))
    T = max(int(frames.max()), 1) if frames.numel() else 1
    t = torch.arange(T, device=x.device)
    if rounding == "openomni":  # as OpenOmni's _uniform_assignment: int64 / float32 in the default dtype
        source = (t[None] / (frames / lengths.clamp(min=1))[:, None]).long()
    else:
        source = (t[None] * lengths[:, None]) // frames.clamp(min=1)[:, None]
    out = x.gather(1, source.clamp(max=x.shape[1] - 1)[..., None].expand(-1, -1, x.shape[2]))
    return out * (t[None] < frames[:, None])[..., None].to(out.dtype), frames


class SpeechDecoder(nn.Module):
    """OpenOmni's speech generator's front end (see the module docstring), shared by
    :class:`~omnifast.nn.ctc_decoder.CTCSpeechDecoder` (``mode="nar"``) and
    :class:`~omnifast.nn.ar_decoder.ARSpeechDecoder` (``mode="ar"``); ``build_speech_decoder``
    makes the one a mode names."""

    mode = "nar"

    def __init__(self, config: SpeechDecoderConfig, mode: Optional[str] = None, backend: Optional[str] = None):
        super().__init__()
        from transformers import Qwen2Model

        if not isinstance(config, SpeechDecoderConfig):
            raise TypeError(f"config must be a SpeechDecoderConfig, got {type(config).__name__}")
        if mode is not None and check_choice("mode", mode, ("nar", "ar")) != self.mode:
            raise ValueError(f"a {type(self).__name__} is mode={self.mode!r}, not {mode!r}")
        self.config, self.backend = config, backend
        self.packing = False  # run the decoder layers over packed records (no padded frames); same results
        c = config
        self.specials = nn.Embedding(2, c.llm_hidden)  # sos, task: around the LLM states
        self.moe = MoE(
            c.llm_hidden,
            c.width * c.split_tokens,
            c.width * c.split_tokens,
            experts=c.experts,
            top_k=None,
            split_tokens=c.split_tokens,
            backend=backend,
            gate_bias=True,
        )
        self.text_guided = TextGuidedModule(
            c.width, c.fusion_depth, c.fusion_heads, c.fusion_head_dim, c.fusion_ff_mult
        )
        self.decoder = Qwen2Model(c.qwen2())

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, hidden, text_tokens, hidden_mask, text_mask):
        check_tensor("hidden", hidden, floating=True)
        check_tensor("text_tokens", text_tokens, integer=True)
        if hidden.dim() != 3 or hidden.shape[2] != self.config.llm_hidden:
            raise ValueError(
                f"hidden must be (B, N, {self.config.llm_hidden}) (the config's llm_hidden), "
                f"got shape {tuple(hidden.shape)}"
            )
        if text_tokens.dim() != 2:
            raise ValueError(f"text_tokens must be (B, L), got shape {tuple(text_tokens.shape)}")
        if text_tokens.shape[0] != hidden.shape[0]:
            raise ValueError(f"text_tokens has batch size {text_tokens.shape[0]} but hidden has {hidden.shape[0]}")
        hidden_lengths = _prefix_lengths("hidden_mask", hidden_mask, tuple(hidden.shape[:2]), hidden.device)
        text_lengths = _prefix_lengths("text_mask", text_mask, tuple(text_tokens.shape), hidden.device)
        if text_tokens.numel() and int(text_lengths.min()) < 1:
            raise ValueError("every sequence needs at least one text token")
        real = text_tokens[torch.arange(text_tokens.shape[1], device=text_tokens.device) < text_lengths[:, None]]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.config.text_vocab):
            raise ValueError(f"text_tokens must be in [0, {self.config.text_vocab}) (text_vocab)")
        return hidden_lengths, text_lengths

    def _check_units(self, name: str, units: torch.Tensor, lengths, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded units (B, U) (padding IGNORE_INDEX, or given ``lengths``) -> (units >= 0, lengths)."""
        check_tensor(name, units, integer=True)
        if units.dim() != 2 or units.shape[0] != batch:
            raise ValueError(f"{name} must be (B={batch}, U), got shape {tuple(units.shape)}")
        if lengths is None:
            lengths = (units != IGNORE_INDEX).sum(1)
        else:
            lengths = torch.as_tensor(lengths, device=units.device).long().reshape(-1)
        real = units[torch.arange(units.shape[1], device=units.device) < lengths[:, None]]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.config.units):
            raise ValueError(
                f"{name} must be in [0, {self.config.units}) (the unit vocabulary), "
                f"got values in [{int(real.min())}, {int(real.max())}]"
            )
        return units.clamp(min=0), lengths

    # ---- the shared front: MoE + text-guided module -----------------------------------------
    def _expand(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden.to(self.moe.w1.dtype)).output

    def fuse_text(
        self, hidden: torch.Tensor, text_tokens: torch.Tensor, hidden_mask=None, text_mask=None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The text-guided embeddings (B, L, width) of the response text and its lengths (B,)."""
        hidden_lengths, text_lengths = self._check(hidden, text_tokens, hidden_mask, text_mask)
        B, N, _ = hidden.shape
        S = self.config.split_tokens
        pos = torch.arange(N + 2, device=hidden.device)
        n = hidden_lengths[:, None]
        sos, task = self.specials.weight.to(hidden.dtype)
        context = F.pad(hidden, (0, 0, 1, 1))  # position p holds hidden[p - 1]
        context = torch.where((pos == 0)[None, :, None], sos, context)
        context = torch.where((pos[None] == n + 1)[..., None], task, context)
        context = context * (pos[None] <= n + 1)[..., None].to(context.dtype)
        if self.packing:  # the MoE on the real rows only (row by row: the same numbers)
            rows = n[:, 0] + 2
            expanded = self._expand(pack(context, rows)[None])[0].reshape(-1, S * self.config.width)
            expanded = unpack(expanded, rows, N + 2).reshape(B, (N + 2) * S, self.config.width)
        else:
            expanded = self._expand(context)  # (B, (N + 2) * S, width)
        context_mask = torch.arange((N + 2) * S, device=hidden.device)[None] < (n + 2) * S
        groups = None
        if self.config.fusion_causal:  # sos -> -1 (seen by all), LLM state j -> j, task -> n (seen by none)
            groups = (pos.repeat_interleave(S) - 1)[None].expand(B, -1)
        tokens = text_tokens.masked_fill(
            torch.arange(text_tokens.shape[1], device=hidden.device) >= text_lengths[:, None], 0
        )
        queries = self.decoder.embed_tokens(tokens)
        return self.text_guided(queries, expanded.to(queries.dtype), context_mask, groups), text_lengths

    def run_decoder(self, embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The Qwen2 decoder layers over ``embeds`` (B, T, width), the first ``lengths[b]`` positions
        of each row real (causal, or bidirectional over the real positions)."""
        B, T, _ = embeds.shape
        valid = torch.arange(T, device=embeds.device)[None] < lengths[:, None]
        if self.config.causal:
            mask = valid.long()
        else:  # a prepared mask skips transformers' causal one: every frame sees every real frame
            mask = {"full_attention": valid[:, None, None, :].expand(B, 1, T, T)}
        positions = torch.arange(T, device=embeds.device)[None].expand(B, -1)
        return self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state

    def decode(self, embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`run_decoder`, or with ``packing`` the same over the records packed end to end
        (each attending within itself), returned right-padded with zeros."""
        if not self.packing:
            return self.run_decoder(embeds, lengths)
        packed = run_packed(self.decoder, pack(embeds, lengths), lengths, self.config.causal)
        return unpack(packed, lengths, embeds.shape[1])

    def stream(self, chunks):
        """Streaming decoding: the NAR (CTC) decoder's (see ``ctc_decoder.py``)."""
        self._require("nar")

    def sample_units(self, *args, **kwargs):
        """Sampling with a KV cache: the AR decoder's (see ``ar_decoder.py``)."""
        self._require("ar")

    def _require(self, mode: str) -> None:
        if self.mode != mode:
            raise ValueError(f"this needs a decoder in mode={mode!r}, this one is mode={self.mode!r}")
