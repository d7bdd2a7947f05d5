"""The AR speech decoder: the front end's fused text as a prompt, [sos | fused text | task | units],
next-unit prediction through the Qwen2 decoder and a unit head with an end of speech (see
``speech_decoder.py``).

Its losses never form the (B, U, V) logits: cross-entropy over chunks of rows
(``linear_cross_entropy``), and for DPO each sequence's log-likelihood of its chosen and of its
rejected units, both in one decoder pass (the 2B sequences share the batch), from per-row
cross-entropies that recompute their chunks in the backward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from omnifast.ops.decode import sample_top_k_top_p
from omnifast.ops.dpo import DPOOutput, check_normalization, dpo_from_logps, normalize
from omnifast.ops.linear_cross_entropy import linear_cross_entropy

from .kv_cache import forward_with_cache
from .speech_decoder import IGNORE_INDEX, SpeechDecoder, SpeechDecoderConfig, SpeechDecoderOutput


class ARSpeechDecoder(SpeechDecoder):
    """``build_speech_decoder(config, "ar")``: ``config.units`` units and an end of speech (= units)."""

    mode = "ar"

    def __init__(self, config: SpeechDecoderConfig, mode: Optional[str] = None, backend: Optional[str] = None):
        super().__init__(config, mode, backend)
        self.ar_specials = nn.Embedding(2, config.width)  # sos, task: around the fused text
        self.unit_embedding = nn.Embedding(config.units, config.width)
        self.head = nn.Linear(config.width, config.units + 1)  # + eos (= units)

    def _inputs(self, fused, text_lengths, units, unit_lengths):
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

    def _targets(self, seq_len: int, text_lengths, units, unit_lengths) -> torch.Tensor:
        """Position task + k predicts unit k (k < U) and then eos (= units); the rest is ignored."""
        p = torch.arange(seq_len, device=units.device)[None]
        k = p - (text_lengths[:, None] + 1)
        padded = F.pad(units, (0, 1), value=0)
        targets = padded.gather(1, k.clamp(0, units.shape[1]))
        targets = torch.where(k == unit_lengths[:, None], self.config.units, targets)
        return torch.where((k >= 0) & (k <= unit_lengths[:, None]), targets, IGNORE_INDEX)

    def _states_and_targets(self, fused, text_lengths, units, unit_lengths):
        seq, total = self._inputs(fused, text_lengths, units, unit_lengths)
        states = self.decode(seq, total)
        return states, total, self._targets(seq.shape[1], text_lengths, units, unit_lengths)

    def forward(
        self, hidden, text_tokens, hidden_mask=None, text_mask=None, units=None, unit_lengths=None
    ) -> SpeechDecoderOutput:
        """Decoder states and the next-unit cross-entropy (mean over units + eos)."""
        if units is None:
            raise ValueError("the AR decoder's forward needs target units (use generate to sample)")
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        units, unit_lengths = self._check_units("units", units, unit_lengths, hidden.shape[0])
        states, total, targets = self._states_and_targets(fused, text_lengths, units, unit_lengths)
        loss = linear_cross_entropy(
            states.reshape(-1, states.shape[-1]), self.head.weight, self.head.bias, targets.reshape(-1)
        )
        return SpeechDecoderOutput(loss, states, total)

    # ---- preference training ---------------------------------------------------------------------
    def log_likelihoods(
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
    ) -> Tuple[torch.Tensor, ...]:
        """log p(chosen + eos) and log p(rejected + eos) of every sequence (B,) each, and the two
        length tensors (units + eos): the front end once, the decoder once over 2B sequences."""
        B = hidden.shape[0]
        chosen, chosen_lengths = self._check_units("chosen", chosen, chosen_lengths, B)
        rejected, rejected_lengths = self._check_units("rejected", rejected, rejected_lengths, B)
        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        width = max(chosen.shape[1], rejected.shape[1])
        units = torch.cat(
            [F.pad(chosen, (0, width - chosen.shape[1])), F.pad(rejected, (0, width - rejected.shape[1]))]
        )
        states, _, targets = self._states_and_targets(
            fused.repeat(2, 1, 1), text_lengths.repeat(2), units, torch.cat([chosen_lengths, rejected_lengths])
        )
        rows = linear_cross_entropy(
            states.reshape(-1, states.shape[-1]),
            self.head.weight,
            self.head.bias,
            targets.reshape(-1),
            reduction="none",
        )
        ll = -rows.view(2 * B, -1).sum(1)
        return ll[:B], ll[B:], chosen_lengths + 1, rejected_lengths + 1

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
        """DPO of the chosen over the rejected units (log-likelihoods of units + eos) against a
        frozen reference's from :meth:`reference_logps` with the same ``normalization``."""
        check_normalization(normalization)
        ll_w, ll_l, len_w, len_l = self.log_likelihoods(
            hidden,
            text_tokens,
            chosen,
            rejected,
            hidden_mask=hidden_mask,
            text_mask=text_mask,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        policy_w, policy_l = normalize(ll_w, len_w, normalization), normalize(ll_l, len_l, normalization)
        if normalization == "openomni":  # the reference's raw values, combined per batch as the policy's
            ref_w = normalize(ref_chosen_logps.to(ll_w), len_w, "openomni")
            ref_l = normalize(ref_rejected_logps.to(ll_l), len_l, "openomni")
        else:
            ref_w, ref_l = ref_chosen_logps.to(ll_w), ref_rejected_logps.to(ll_l)
        sft = -ll_w.sum() / len_w.sum().clamp(min=1)
        return dpo_from_logps(policy_w, policy_l, ref_w, ref_l, beta, sft, sft_weight)

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
        :meth:`dpo_loss` with the same ``normalization`` ("length": divided by units + 1;
        "openomni": raw, combined per batch in the loss)."""
        check_normalization(normalization)
        ll_w, ll_l, len_w, len_l = self.log_likelihoods(
            hidden,
            text_tokens,
            chosen,
            rejected,
            hidden_mask=hidden_mask,
            text_mask=text_mask,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        if normalization == "length":
            return normalize(ll_w, len_w, "length"), normalize(ll_l, len_l, "length")
        return ll_w, ll_l

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, hidden, text_tokens, hidden_mask=None, text_mask=None, **sampling) -> List[List[int]]:
        """Sampled units of each sequence (see :meth:`sample_units`)."""
        return self.sample_units(hidden, text_tokens, hidden_mask, text_mask, **sampling)

    @torch.no_grad()
    def sample_units(
        self,
        hidden,
        text_tokens,
        hidden_mask=None,
        text_mask=None,
        *,
        max_units: Optional[int] = None,
        top_k: int = 25,
        top_p: float = 0.8,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> List[List[int]]:
        """AR generation, one sequence at a time with a KV cache: top-k / top-p sampling (or
        greedy) until eos or ``max_units`` (default: upsample_factor units per text token)."""
        from transformers.cache_utils import DynamicCache

        fused, text_lengths = self.fuse_text(hidden, text_tokens, hidden_mask, text_mask)
        results = []
        for b in range(fused.shape[0]):
            L = int(text_lengths[b])
            limit = max_units if max_units is not None else L * self.config.upsample_factor
            empty = torch.zeros(1, 0, dtype=torch.long, device=fused.device)
            seq, _ = self._inputs(
                fused[b : b + 1, :L], text_lengths[b : b + 1], empty, torch.zeros_like(text_lengths[b : b + 1])
            )
            cache = DynamicCache(config=self.decoder.config)
            out = forward_with_cache(self.decoder, cache, inputs_embeds=seq).last_hidden_state
            units: List[int] = []
            while len(units) < limit:
                logits = self.head(out[0, -1]).float()
                unit = (
                    int(logits.argmax()) if greedy else sample_top_k_top_p(logits, top_k, top_p, temperature, generator)
                )
                if unit == self.config.units:
                    break
                units.append(unit)
                step = self.unit_embedding.weight[unit][None, None].to(seq.dtype)
                out = forward_with_cache(self.decoder, cache, inputs_embeds=step).last_hidden_state
            results.append(units)
        return results
