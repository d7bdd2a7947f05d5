"""The NAR speech decoder: the front end's fused text upsampled ``upsample_factor`` times, the
Qwen2 decoder over the frames, a CTC head over V units + blank (see ``speech_decoder.py``).

Its losses never form the (B, T, V) logits: the CTC loss is the fused linear-CTC, its CTC-DPO
scores chosen and rejected on one emission sequence (frames enough for either, the faster way,
exact when factor x text tokens covers both sides' units) or, with ``normalization="openomni"``,
each side on its own upsampling as OpenOmni's DPO does.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import torch

from omnifast.ops import ctc_greedy_decode, linear_ctc_loss
from omnifast.ops.dpo import DPOOutput, check_normalization, dpo_from_logps, normalize

from .heads import CTCDPOLoss, LinearCTCHead
from .kv_cache import forward_with_cache
from .speech_decoder import SpeechDecoder, SpeechDecoderConfig, SpeechDecoderOutput, uniform_upsample


class CTCSpeechDecoder(SpeechDecoder):
    """``build_speech_decoder(config, "nar")``."""

    mode = "nar"

    def __init__(self, config: SpeechDecoderConfig, mode: Optional[str] = None, backend: Optional[str] = None):
        super().__init__(config, mode, backend)
        self.head = LinearCTCHead(config.width, config.units, backend=backend)

    def frame_states(
        self, hidden, text_tokens, hidden_mask=None, text_mask=None, min_frames: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs (B, T, width) over the upsampled text, and the frame counts (B,)."""
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        frames, frame_lengths = uniform_upsample(
            fused, text_lengths, self.config.upsample_factor, min_frames, self.config.upsample_rounding
        )
        return self.decode(frames, frame_lengths), frame_lengths

    def forward(
        self, hidden, text_tokens, hidden_mask=None, text_mask=None, units=None, unit_lengths=None
    ) -> SpeechDecoderOutput:
        """Decoder states and, given target ``units`` (B, U) (padded with -100, or with
        ``unit_lengths``), the CTC loss normalised as ``config.loss_normalization``."""
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

    # ---- preference training ---------------------------------------------------------------------
    def _pairs(self, hidden, chosen, rejected, chosen_lengths, rejected_lengths):
        B = hidden.shape[0]
        chosen, chosen_lengths = self._check_units("chosen", chosen, chosen_lengths, B)
        rejected, rejected_lengths = self._check_units("rejected", rejected, rejected_lengths, B)
        return chosen, chosen_lengths, rejected, rejected_lengths

    def _side_log_likelihoods(self, hidden, text_tokens, hidden_mask, text_mask, units, lengths):
        """Per-sequence CTC log-likelihoods of ``units`` on their own upsampling (OpenOmni's)."""
        states, frames = self.frame_states(hidden, text_tokens, hidden_mask, text_mask, lengths)
        return -linear_ctc_loss(
            states,
            self.head.weight,
            self.head.bias,
            units,
            frames,
            lengths,
            self.head.blank,
            "none",
            self.config.zero_infinity,
            chunk_frames=self.head.chunk_frames,
            backend=self.head.backend,
        )

    def dpo_loss(
        self,
        hidden,
        text_tokens,
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        *,
        beta: float = 0.1,
        hidden_mask=None,
        text_mask=None,
        chosen_lengths=None,
        rejected_lengths=None,
        normalization: str = "sum",
        sft_weight: float = 0.0,
    ) -> DPOOutput:
        """CTC-DPO of the chosen over the rejected units against a frozen reference's
        log-likelihoods from :meth:`reference_logps` with the same ``normalization``
        (``omnifast.ops.dpo``). "sum" and "length": both sides on one emission sequence long
        enough for either (the sparse or dense fused path); "openomni": each on its own."""
        check_normalization(normalization)
        chosen, chosen_lengths, rejected, rejected_lengths = self._pairs(
            hidden, chosen, rejected, chosen_lengths, rejected_lengths
        )
        if normalization != "openomni":
            states, frames = self.frame_states(
                hidden, text_tokens, hidden_mask, text_mask, torch.maximum(chosen_lengths, rejected_lengths)
            )
            loss = CTCDPOLoss(beta, normalization == "length", sft_weight, self.config.zero_infinity)
            return loss(
                self.head,
                states,
                chosen,
                rejected,
                frames,
                chosen_lengths,
                rejected_lengths,
                ref_chosen_logps,
                ref_rejected_logps,
            )
        ll_w = self._side_log_likelihoods(hidden, text_tokens, hidden_mask, text_mask, chosen, chosen_lengths)
        ll_l = self._side_log_likelihoods(hidden, text_tokens, hidden_mask, text_mask, rejected, rejected_lengths)
        policy_w, policy_l = normalize(ll_w, chosen_lengths, "openomni"), normalize(ll_l, rejected_lengths, "openomni")
        ref_w = normalize(ref_chosen_logps.to(ll_w), chosen_lengths, "openomni")
        ref_l = normalize(ref_rejected_logps.to(ll_l), rejected_lengths, "openomni")
        return dpo_from_logps(policy_w, policy_l, ref_w, ref_l, beta, -policy_w.sum(), sft_weight)

    @torch.no_grad()
    def reference_logps(
        self,
        hidden,
        text_tokens,
        chosen,
        rejected,
        *,
        hidden_mask=None,
        text_mask=None,
        chosen_lengths=None,
        rejected_lengths=None,
        normalization: str = "sum",
    ):
        """This (frozen) decoder's per-record log-likelihoods of chosen and rejected, for
        :meth:`dpo_loss` with the same ``normalization`` ("length": divided by the unit count;
        "openomni": each side on its own upsampling, combined per batch in the loss)."""
        check_normalization(normalization)
        chosen, chosen_lengths, rejected, rejected_lengths = self._pairs(
            hidden, chosen, rejected, chosen_lengths, rejected_lengths
        )
        if normalization == "openomni":
            return (
                self._side_log_likelihoods(hidden, text_tokens, hidden_mask, text_mask, chosen, chosen_lengths),
                self._side_log_likelihoods(hidden, text_tokens, hidden_mask, text_mask, rejected, rejected_lengths),
            )
        states, frames = self.frame_states(
            hidden, text_tokens, hidden_mask, text_mask, torch.maximum(chosen_lengths, rejected_lengths)
        )
        return CTCDPOLoss(length_normalize=normalization == "length").reference(
            self.head, states, chosen, rejected, frames, chosen_lengths, rejected_lengths
        )

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, hidden, text_tokens, hidden_mask=None, text_mask=None) -> List[List[int]]:
        """Greedy CTC decoding of each sequence's units."""
        states, lengths = self.frame_states(hidden, text_tokens, hidden_mask, text_mask)
        return ctc_greedy_decode(self.head(states), lengths, blank=self.head.blank)

    @torch.no_grad()
    def stream(self, chunks: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Iterator[List[int]]:
        """Streaming decoding of one sequence. ``chunks`` yields (hidden (n, H) or (1, n, H), text
        tokens (n,) or (1, n)) as the LLM produces them, one LLM state per text token; each step
        yields the units that became final, keeping the decoder's KV cache, so no prefix is
        recomputed. Needs ``causal`` and ``fusion_causal``; equal to :meth:`generate` on the whole
        (greedy CTC decoding, the last frame of a chunk carried into the next)."""
        if not (self.config.causal and self.config.fusion_causal):
            raise ValueError("stream needs config.causal=True and config.fusion_causal=True")
        from transformers.cache_utils import DynamicCache

        c = self.config
        cache = DynamicCache(config=self.decoder.config)
        context = [self._expand(self.specials.weight[:1][None])]
        groups = [torch.full((c.split_tokens,), -1, device=context[0].device)]
        tokens_done = frames_done = 0
        previous = None  # the last frame's logits: a repeat across chunks collapses
        for hidden, tokens in chunks:
            hidden = hidden if hidden.dim() == 3 else hidden[None]
            tokens = tokens if tokens.dim() == 2 else tokens[None]
            if tokens.shape[-1] < 1:
                raise ValueError("each chunk must hold at least one text token (chunk size >= 1)")
            self._check(hidden, tokens, None, None)
            n = tokens.shape[1]
            if hidden.shape[:2] != (1, n):
                raise ValueError(
                    f"each chunk needs one LLM state per text token and batch size 1, got hidden "
                    f"{tuple(hidden.shape)} and text tokens {tuple(tokens.shape)}"
                )
            context.append(self._expand(hidden))
            groups.append(
                torch.arange(tokens_done, tokens_done + n, device=hidden.device).repeat_interleave(c.split_tokens)
            )
            queries = self.decoder.embed_tokens(tokens)
            fused = self.text_guided(
                queries,
                torch.cat(context, 1).to(queries.dtype),
                None,
                torch.cat(groups)[None],
                query_offset=tokens_done,
            )
            frames = fused.repeat_interleave(c.upsample_factor, dim=1)
            positions = torch.arange(frames_done, frames_done + frames.shape[1], device=hidden.device)[None]
            states = forward_with_cache(
                self.decoder, cache, inputs_embeds=frames, position_ids=positions
            ).last_hidden_state
            logits = self.head(states)[0]
            carried = logits if previous is None else torch.cat([previous, logits])
            units = ctc_greedy_decode(carried, blank=self.head.blank)[0]
            if previous is not None and int(previous.argmax()) != self.head.blank and units:
                units = units[1:]  # the carried frame's unit was yielded with the last chunk
            previous = logits[-1:]
            tokens_done, frames_done = tokens_done + n, frames_done + frames.shape[1]
            yield units
