"""OpenOmni's speech generator on omnifast's kernels.

LLM hidden states of the response -> [sos | states | task] -> dense MoE (4 experts, each state
split into 4 tokens of the decoder width) -> text-guided module (the decoder's embeddings of the
response text attend to them) -> then either

* ``mode="nar"``: upsample each text position ``upsample_factor`` times (uniform assignment, at
  least as many frames as the target has units) -> Qwen2 decoder layers (``transformers``'
  ``Qwen2Model`` fed ``inputs_embeds``; causal by default, bidirectional optional) -> CTC head
  over V units + blank, trained with the fused linear-CTC (the (B, T, V) logits never exist) or
  CTC-DPO; or
* ``mode="ar"``: the same decoder over [sos | fused text | task | units], next-unit prediction
  with a chunked fused linear cross-entropy, sampled with a KV cache.

Where OpenOmni's code is broken or wasteful this module differs: prediction works (its
``predict`` uses undefined names), no 151,936-word vocabulary head runs on the frames, and
streaming keeps the decoder's KV cache instead of re-running the prefix. In causal mode the
text-guided attention is causal too by default (``fusion_causal``: text token i sees the LLM
states of tokens <= i), which is what makes streaming equal to one full pass; OpenOmni's own
model is ``causal=True, fusion_causal=False``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifast.ops import ctc_greedy_decode
from omnifast.ops.decode import sample_top_k_top_p
from omnifast.ops._checks import check_choice, check_known_keys, check_tensor
from omnifast.ops.ctc_dpo import CTCDPOOutput
from omnifast.ops.linear_cross_entropy import linear_cross_entropy

from .heads import CTCDPOLoss, LinearCTCHead
from .moe import MoE
from .packing import pack, run_packed, unpack
from .text_guided import TextGuidedModule

IGNORE_INDEX = -100


@dataclass
class SpeechDecoderConfig:
    """Sizes of the speech decoder. The defaults are OpenOmni's: a Qwen2.5-7B LLM (3584 wide)
    in front, a Qwen2.5-0.5B-sized decoder (24 layers, 896 wide, 14 heads, 2 KV heads), 6561
    units (blank = 6561), 12x upsampling."""
    llm_hidden: int = 3584
    width: int = 896
    units: int = 6561
    upsample_factor: int = 12
    experts: int = 4
    split_tokens: int = 4
    fusion_depth: int = 2
    fusion_heads: int = 16
    fusion_head_dim: int = 256
    fusion_ff_mult: int = 4
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    text_vocab: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 32768
    causal: bool = True         # decoder self-attention; False: bidirectional over the frames
    fusion_causal: bool = True  # text token i sees the LLM states of tokens <= i (False: all, as OpenOmni)
    loss_normalization: str = "openomni"  # "openomni": sum / total units; "mean": per-sequence mean
    zero_infinity: bool = True

    @classmethod
    def tiny(cls, **overrides) -> "SpeechDecoderConfig":
        """A few hundred thousand parameters: for tests and the CPU demo."""
        sizes = dict(llm_hidden=48, width=32, units=20, upsample_factor=3, fusion_heads=2, fusion_head_dim=16,
                     fusion_ff_mult=2, layers=2, heads=4, kv_heads=2, intermediate=64, text_vocab=100,
                     max_positions=4096)
        return cls(**{**sizes, **overrides})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        check_choice("loss_normalization", self.loss_normalization, ("openomni", "mean"))
        if self.heads % self.kv_heads or self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width}) and be a multiple of "
                             f"kv_heads ({self.kv_heads})")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "SpeechDecoderConfig":
        check_known_keys("speech decoder config", values, cls)
        return cls(**values)

    def qwen2(self):
        from transformers import Qwen2Config
        return Qwen2Config(vocab_size=self.text_vocab, hidden_size=self.width, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
                           rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})


@dataclass
class SpeechDecoderOutput:
    loss: Optional[torch.Tensor]  # float32 scalar when targets were given
    states: torch.Tensor          # (B, T, width) decoder outputs (frames, or AR positions)
    lengths: torch.Tensor         # (B,) valid positions of ``states``


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


def uniform_upsample(x: torch.Tensor, lengths: torch.Tensor, factor: int,
                     min_frames: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Repeat each of the first ``lengths[b]`` rows of ``x`` (B, N, D) over
    ``frames = max(lengths * factor, min_frames)`` frames by uniform assignment (frame t takes row
    t * lengths // frames); frames past a row's count are zero. Returns (frames, frame lengths)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upsample factor must be an int >= 1, got {factor!r}")
    frames = lengths * factor
    if min_frames is not None:
        frames = torch.maximum(frames, min_frames.to(frames))
    T = max(int(frames.max()), 1) if frames.numel() else 1
    t = torch.arange(T, device=x.device)
    source = (t[None] * lengths[:, None]) // frames.clamp(min=1)[:, None]
    out = x.gather(1, source.clamp(max=x.shape[1] - 1)[..., None].expand(-1, -1, x.shape[2]))
    return out * (t[None] < frames[:, None])[..., None].to(out.dtype), frames


class SpeechDecoder(nn.Module):
    """OpenOmni's speech generator (see the module docstring). ``mode``: "nar" (CTC) or "ar"."""

    def __init__(self, config: SpeechDecoderConfig, mode: str = "nar", backend: Optional[str] = None):
        super().__init__()
        from transformers import Qwen2Model
        if not isinstance(config, SpeechDecoderConfig):
            raise TypeError(f"config must be a SpeechDecoderConfig, got {type(config).__name__}")
        self.config, self.mode = config, check_choice("mode", mode, ("nar", "ar"))
        self.packing = False  # run the decoder layers over packed records (no padded frames); same results
        c = config
        self.specials = nn.Embedding(2, c.llm_hidden)  # sos, task: around the LLM states
        self.moe = MoE(c.llm_hidden, c.width * c.split_tokens, c.width * c.split_tokens, experts=c.experts,
                       top_k=None, split_tokens=c.split_tokens, backend=backend, gate_bias=True)
        self.text_guided = TextGuidedModule(c.width, c.fusion_depth, c.fusion_heads, c.fusion_head_dim,
                                            c.fusion_ff_mult)
        self.decoder = Qwen2Model(c.qwen2())
        if mode == "nar":
            self.head = LinearCTCHead(c.width, c.units, backend=backend)
        else:
            self.ar_specials = nn.Embedding(2, c.width)  # sos, task: around the fused text
            self.unit_embedding = nn.Embedding(c.units, c.width)
            self.head = nn.Linear(c.width, c.units + 1)  # + eos (= units)

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, hidden, text_tokens, hidden_mask, text_mask):
        check_tensor("hidden", hidden, floating=True)
        check_tensor("text_tokens", text_tokens, integer=True)
        if hidden.dim() != 3 or hidden.shape[2] != self.config.llm_hidden:
            raise ValueError(f"hidden must be (B, N, {self.config.llm_hidden}) (the config's llm_hidden), "
                             f"got shape {tuple(hidden.shape)}")
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
            raise ValueError(f"{name} must be in [0, {self.config.units}) (the unit vocabulary), "
                             f"got values in [{int(real.min())}, {int(real.max())}]")
        return units.clamp(min=0), lengths

    # ---- the shared front: MoE + text-guided module -----------------------------------------
    def _expand(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden.to(self.moe.w1.dtype)).output

    def fuse_text(self, hidden: torch.Tensor, text_tokens: torch.Tensor, hidden_mask=None,
                  text_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
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
        tokens = text_tokens.masked_fill(torch.arange(text_tokens.shape[1], device=hidden.device) >= text_lengths[:, None], 0)
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
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            use_cache=False).last_hidden_state

    def decode(self, embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`run_decoder`, or with ``packing`` the same over the records packed end to end
        (each attending within itself), returned right-padded with zeros."""
        if not self.packing:
            return self.run_decoder(embeds, lengths)
        packed = run_packed(self.decoder, pack(embeds, lengths), lengths, self.config.causal)
        return unpack(packed, lengths, embeds.shape[1])

    # ---- NAR ----------------------------------------------------------------------------------
    def frame_states(self, hidden, text_tokens, hidden_mask=None, text_mask=None,
                     min_frames: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """NAR decoder outputs (B, T, width) over the upsampled text, and the frame counts (B,)."""
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        frames, frame_lengths = uniform_upsample(fused, text_lengths, self.config.upsample_factor, min_frames)
        return self.decode(frames, frame_lengths), frame_lengths

    def forward(self, hidden, text_tokens, hidden_mask=None, text_mask=None, units=None,
                unit_lengths=None) -> SpeechDecoderOutput:
        """Decoder states and, given target ``units`` (B, U) (padded with -100, or with
        ``unit_lengths``), the loss: CTC (NAR, normalised as ``config.loss_normalization``) or
        next-unit cross-entropy (AR, mean over units + eos)."""
        if self.mode == "ar":
            return self._ar_forward(hidden, text_tokens, hidden_mask, text_mask, units, unit_lengths)
        if units is None:
            states, lengths = self.frame_states(hidden, text_tokens, hidden_mask, text_mask)
            return SpeechDecoderOutput(None, states, lengths)
        units, unit_lengths = self._check_units("units", units, unit_lengths, hidden.shape[0])
        states, lengths = self.frame_states(hidden, text_tokens, hidden_mask, text_mask, unit_lengths)
        return SpeechDecoderOutput(self.ctc_loss(states, lengths, units, unit_lengths), states, lengths)

    def ctc_loss(self, states, frame_lengths, units, unit_lengths) -> torch.Tensor:
        """The fused linear-CTC loss of the head over decoder states."""
        if self.config.loss_normalization == "mean":
            return self.head.loss(states, units, frame_lengths, unit_lengths, "mean", self.config.zero_infinity)
        total = self.head.loss(states, units, frame_lengths, unit_lengths, "sum", self.config.zero_infinity)
        return total / unit_lengths.sum().clamp(min=1)

    def _pair_states(self, hidden, text_tokens, hidden_mask, text_mask, chosen, rejected, chosen_lengths,
                     rejected_lengths):
        B = hidden.shape[0]
        chosen, chosen_lengths = self._check_units("chosen", chosen, chosen_lengths, B)
        rejected, rejected_lengths = self._check_units("rejected", rejected, rejected_lengths, B)
        states, lengths = self.frame_states(hidden, text_tokens, hidden_mask, text_mask,
                                            torch.maximum(chosen_lengths, rejected_lengths))
        return states, lengths, chosen, chosen_lengths, rejected, rejected_lengths

    def dpo_loss(self, hidden, text_tokens, chosen, rejected, ref_chosen_logps, ref_rejected_logps, *,
                 beta: float = 0.1, hidden_mask=None, text_mask=None, chosen_lengths=None, rejected_lengths=None,
                 length_normalize: bool = False, sft_weight: float = 0.0) -> CTCDPOOutput:
        """CTC-DPO of the chosen over the rejected units (both scored on one emission sequence,
        long enough for either) against a frozen reference's log-likelihoods."""
        self._require("nar")
        states, lengths, chosen, chosen_lengths, rejected, rejected_lengths = self._pair_states(
            hidden, text_tokens, hidden_mask, text_mask, chosen, rejected, chosen_lengths, rejected_lengths)
        loss = CTCDPOLoss(beta, length_normalize, sft_weight, self.config.zero_infinity)
        return loss(self.head, states, chosen, rejected, lengths, chosen_lengths, rejected_lengths,
                    ref_chosen_logps, ref_rejected_logps)

    @torch.no_grad()
    def reference_logps(self, hidden, text_tokens, chosen, rejected, *, hidden_mask=None, text_mask=None,
                        chosen_lengths=None, rejected_lengths=None, length_normalize: bool = False):
        """This (frozen) decoder's log-likelihoods of chosen and rejected, for :meth:`dpo_loss`."""
        self._require("nar")
        states, lengths, chosen, chosen_lengths, rejected, rejected_lengths = self._pair_states(
            hidden, text_tokens, hidden_mask, text_mask, chosen, rejected, chosen_lengths, rejected_lengths)
        return CTCDPOLoss(length_normalize=length_normalize).reference(
            self.head, states, chosen, rejected, lengths, chosen_lengths, rejected_lengths)

    @torch.no_grad()
    def generate(self, hidden, text_tokens, hidden_mask=None, text_mask=None, **sampling) -> List[List[int]]:
        """Units of each sequence: greedy CTC decoding (NAR) or sampling with a KV cache (AR, see
        :meth:`sample_units`)."""
        if self.mode == "ar":
            return self.sample_units(hidden, text_tokens, hidden_mask, text_mask, **sampling)
        states, lengths = self.frame_states(hidden, text_tokens, hidden_mask, text_mask)
        return ctc_greedy_decode(self.head(states), lengths, blank=self.head.blank)

    @torch.no_grad()
    def stream(self, chunks: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Iterator[List[int]]:
        """Streaming NAR decoding of one sequence. ``chunks`` yields (hidden (n, H) or (1, n, H),
        text tokens (n,) or (1, n)) as the LLM produces them, one LLM state per text token; each
        step yields the units that became final, keeping the decoder's KV cache, so no prefix is
        recomputed. Needs ``causal`` and ``fusion_causal``; greedy, equal to :meth:`generate` on
        the whole."""
        self._require("nar")
        if not (self.config.causal and self.config.fusion_causal):
            raise ValueError("stream needs config.causal=True and config.fusion_causal=True")
        from transformers.cache_utils import DynamicCache
        c = self.config
        cache = DynamicCache(config=self.decoder.config)
        context = [self._expand(self.specials.weight[:1][None])]
        groups = [torch.full((c.split_tokens,), -1, device=context[0].device)]
        tokens_done = frames_done = 0
        previous = None
        for hidden, tokens in chunks:
            hidden = hidden if hidden.dim() == 3 else hidden[None]
            tokens = tokens if tokens.dim() == 2 else tokens[None]
            if tokens.shape[-1] < 1:
                raise ValueError("each chunk must hold at least one text token (chunk size >= 1)")
            self._check(hidden, tokens, None, None)
            n = tokens.shape[1]
            if hidden.shape[:2] != (1, n):
                raise ValueError(f"each chunk needs one LLM state per text token and batch size 1, got hidden "
                                 f"{tuple(hidden.shape)} and text tokens {tuple(tokens.shape)}")
            context.append(self._expand(hidden))
            groups.append(torch.arange(tokens_done, tokens_done + n, device=hidden.device).repeat_interleave(c.split_tokens))
            queries = self.decoder.embed_tokens(tokens)
            fused = self.text_guided(queries, torch.cat(context, 1).to(queries.dtype), None,
                                     torch.cat(groups)[None], query_offset=tokens_done)
            frames = fused.repeat_interleave(c.upsample_factor, dim=1)
            positions = torch.arange(frames_done, frames_done + frames.shape[1], device=hidden.device)[None]
            states = self.decoder(inputs_embeds=frames, position_ids=positions, past_key_values=cache,
                                  use_cache=True).last_hidden_state
            best = self.head(states)[0].argmax(-1).tolist()
            units = []
            for unit in best:
                if unit != previous and unit != self.head.blank:
                    units.append(unit)
                previous = unit
            tokens_done, frames_done = tokens_done + n, frames_done + frames.shape[1]
            yield units

    # ---- AR -----------------------------------------------------------------------------------
    def _ar_inputs(self, fused, text_lengths, units, unit_lengths):
        """[sos | fused text | task | units] per row, right-padded, and the row lengths."""
        B, L, W = fused.shape
        U = units.shape[1]
        total = text_lengths + 2 + unit_lengths
        P = int(total.max())
        p = torch.arange(P, device=fused.device)[None]
        tl_ = text_lengths[:, None]
        sos, task = self.ar_specials.weight.to(fused.dtype)
        text_part = fused.gather(1, (p - 1).clamp(0, L - 1)[..., None].expand(B, P, W))
        unit_ids = units.gather(1, (p - tl_ - 2).clamp(0, max(U - 1, 0)).expand(B, P)) if U else p.expand(B, P) * 0
        unit_part = self.unit_embedding(unit_ids).to(fused.dtype)
        seq = torch.where((p < total[:, None])[..., None], unit_part, 0.0)
        seq = torch.where((p == tl_ + 1)[..., None], task, seq)
        seq = torch.where(((p >= 1) & (p <= tl_))[..., None], text_part, seq)
        seq = torch.where((p == 0)[..., None], sos, seq)
        return seq, total

    def _ar_forward(self, hidden, text_tokens, hidden_mask, text_mask, units, unit_lengths):
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        if units is None:
            raise ValueError("the AR decoder's forward needs target units (use generate to sample)")
        units, unit_lengths = self._check_units("units", units, unit_lengths, hidden.shape[0])
        seq, total = self._ar_inputs(fused, text_lengths, units, unit_lengths)
        states = self.decode(seq, total)
        # position task + k predicts unit k (k < U) and then eos (= units)
        p = torch.arange(seq.shape[1], device=seq.device)[None]
        k = p - (text_lengths[:, None] + 1)
        padded = F.pad(units, (0, 1), value=0)
        targets = padded.gather(1, k.clamp(0, units.shape[1]))
        targets = torch.where(k == unit_lengths[:, None], self.config.units, targets)
        targets = torch.where((k >= 0) & (k <= unit_lengths[:, None]), targets, IGNORE_INDEX)
        loss = linear_cross_entropy(states.reshape(-1, states.shape[-1]), self.head.weight, self.head.bias,
                                    targets.reshape(-1))
        return SpeechDecoderOutput(loss, states, total)

    @torch.no_grad()
    def sample_units(self, hidden, text_tokens, hidden_mask=None, text_mask=None, *, max_units: Optional[int] = None,
                     top_k: int = 25, top_p: float = 0.8, temperature: float = 1.0, greedy: bool = False,
                     generator: Optional[torch.Generator] = None) -> List[List[int]]:
        """AR generation, one sequence at a time with a KV cache: top-k / top-p sampling (or
        greedy) until eos or ``max_units`` (default: upsample_factor units per text token)."""
        self._require("ar")
        from transformers.cache_utils import DynamicCache
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        results = []
        for b in range(fused.shape[0]):
            L = int(text_lengths[b])
            limit = max_units if max_units is not None else L * self.config.upsample_factor
            empty = torch.zeros(1, 0, dtype=torch.long, device=fused.device)
            seq, _ = self._ar_inputs(fused[b:b + 1, :L], text_lengths[b:b + 1], empty, torch.zeros_like(text_lengths[b:b + 1]))
            cache = DynamicCache(config=self.decoder.config)
            out = self.decoder(inputs_embeds=seq, past_key_values=cache, use_cache=True).last_hidden_state
            units: List[int] = []
            while len(units) < limit:
                logits = self.head(out[0, -1]).float()
                unit = int(logits.argmax()) if greedy else sample_top_k_top_p(logits, top_k, top_p, temperature, generator)
                if unit == self.config.units:
                    break
                units.append(unit)
                step = self.unit_embedding.weight[unit][None, None].to(seq.dtype)
                out = self.decoder(inputs_embeds=step, past_key_values=cache, use_cache=True).last_hidden_state
            results.append(units)
        return results

    def _require(self, mode: str) -> None:
        if self.mode != mode:
            raise ValueError(f"this needs a decoder in mode={mode!r}, this one is mode={self.mode!r}")

    # ---- loading OpenOmni checkpoints ---------------------------------------------------------
    @classmethod
    def from_openomni_state_dict(cls, state_dict: Dict[str, torch.Tensor], config: SpeechDecoderConfig,
                                 prefix: str = "", **kwargs) -> "SpeechDecoder":
        """A NAR decoder holding OpenOmni's speech-generator weights (``SpeechGeneratorCTC``: its
        MoE ``input_proj``, text-guided ``fusion``, ``llm`` Qwen2 decoder, ``llm_decoder`` CTC
        projection, ``llm_embedding`` sos/task). ``prefix``: the generator's key prefix in a
        whole-model checkpoint (e.g. ``"speech_generator."``). The decoder's unused vocabulary
        head (``llm.model.lm_head``) is dropped."""
        model = cls(config, "nar", **kwargs)
        model.load_state_dict(openomni_to_omnifast(state_dict, config, prefix))
        return model


def openomni_to_omnifast(state_dict: Dict[str, torch.Tensor], config: SpeechDecoderConfig,
                         prefix: str = "") -> Dict[str, torch.Tensor]:
    """Rename and restack OpenOmni speech-generator keys into :class:`SpeechDecoder`'s."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    E, S, W = config.experts, config.split_tokens, config.width
    out = {"specials.weight": sd["llm_embedding.weight"], "moe.gate.weight": sd["input_proj.gate.fc.weight"],
           "moe.gate.bias": sd["input_proj.gate.fc.bias"], "head.weight": sd["llm_decoder.weight"],
           "head.bias": sd["llm_decoder.bias"]}
    for ours, theirs in (("w1", "fc1.weight"), ("b1", "fc1.bias"), ("w2", "fc2.weight"), ("b2", "fc2.bias")):
        out[f"moe.{ours}"] = torch.stack([sd[f"input_proj.experts.{e}.{theirs}"] for e in range(E)])
    # OpenOmni splits the expert output as (width, split) -> token j gets channels d * S + j;
    # omnifast splits contiguously (token j gets channels j * W + d): reorder the output rows.
    order = (torch.arange(W)[None, :] * S + torch.arange(S)[:, None]).reshape(-1)
    out["moe.w2"], out["moe.b2"] = out["moe.w2"][:, order], out["moe.b2"][:, order]
    attention_names = {"norm_text": "norm_context", "norm_image": "norm_query"}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[:2] == ["fusion", "layers"]:  # fusion.layers.{i}.0 = attention, .1 = feed-forward
            layer, block, rest = parts[2], parts[3], parts[4:]
            if block == "0":
                rest[0] = attention_names.get(rest[0], rest[0])
                out[f"text_guided.layers.{layer}.attn." + ".".join(rest)] = value
            else:
                out[f"text_guided.layers.{layer}.ff." + ".".join(rest)] = value
        elif parts[0] == "fusion":
            out["text_guided." + ".".join(parts[1:])] = value
        elif key.startswith("llm.model.model."):
            out["decoder." + key[len("llm.model.model."):]] = value
    return out
