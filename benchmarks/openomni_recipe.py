"""OpenOmni's training recipe for the speech stages, as its code computes it, on the weights of an
omnifast model (so the two are timed on the same numbers), each piece after OpenOmni's file:

* ``openomni/model/speech_generator_ctc/speech_generator.py`` (``SpeechGeneratorCTC.forward``):
  the dense MoE as a Python loop that stacks every expert's output, the RLSIAT text-guided module
  with its einsum attention, uniform upsampling, the decoder called as a ``Qwen2ForCausalLM``
  whose text-vocabulary logits (151,936 per frame) are formed and dropped, full (B, T, V) unit
  logits -> ``log_softmax`` in float32 -> ``F.ctc_loss`` (sum over the units);
* ``openomni/model/language_model/llava_her_qwen.py`` (``forward``, ``tune_speech_generator_dpo``):
  the DPO scores chosen and rejected with the policy generator in two passes and with a
  deep-copied reference generator in two more; the frozen 7B LLM's forward forms its own text
  logits;
* ``openomni/model/llava_her_arch.py`` (``is_multimodal=True``): every record runs CLIP on a blank
  336-pixel image and Whisper on a 30-second silent mel, whether it has media or not;
* ``openomni/train/train.py``: gradient checkpointing enabled on the model (the speech
  generator's decoder layers recompute their activations in the backward).

``OpenOmniRecipeLoss`` is a loss module for ``Trainer(loss=...)``: the same trainer, optimizer
and step run it as run omnifast's own loss.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from omnifast.models import OmniModel, response_states
from omnifast.nn.speech_decoder import uniform_upsample
from omnifast.training.losses import MODEL_INPUTS
from omnifast.training.stages import Stage

TEXT_VOCAB_HEAD = 151936  # Qwen2ForCausalLM's vocabulary: OpenOmni's decoder forms these logits per frame


def openomni_generator_nll(decoder, states, tokens, mask, units, vocab_logits: bool) -> torch.Tensor:
    """Per-sequence CTC NLL of ``units`` (B, U) computed as OpenOmni's ``SpeechGeneratorCTC`` does,
    on the weights of an omnifast ``SpeechDecoder`` (the same function: the test suite checks the
    losses agree)."""
    c = decoder.config
    B, N, _ = states.shape
    n = mask.sum(1)
    pos = torch.arange(N + 2, device=states.device)
    sos, task = decoder.specials.weight.to(states.dtype)
    context = F.pad(states, (0, 0, 1, 1))
    context = torch.where((pos == 0)[None, :, None], sos, context)
    context = torch.where((pos[None] == n[:, None] + 1)[..., None], task, context)
    context = context * (pos[None] <= n[:, None] + 1)[..., None].to(context.dtype)
    moe = decoder.moe  # MoE.forward: the gate, every expert's output stacked, the weighted sum
    gate = torch.softmax(F.linear(context.float(), moe.gate.weight.float(), moe.gate.bias.float()), -1)
    experts = torch.stack(
        [F.linear(F.relu(F.linear(context, moe.w1[e], moe.b1[e])), moe.w2[e], moe.b2[e]) for e in range(c.experts)],
        dim=-2,
    )
    expanded = (gate.to(experts.dtype)[..., None] * experts).sum(-2)
    expanded = expanded.reshape(B, (N + 2) * c.split_tokens, c.width)
    context_mask = (
        torch.arange((N + 2) * c.split_tokens, device=states.device)[None] < (n[:, None] + 2) * c.split_tokens
    )
    queries = decoder.decoder.embed_tokens(tokens.masked_fill(~mask, 0))
    fused = _rlsiat(
        decoder.text_guided,
        queries,
        expanded.to(queries.dtype),
        context_mask,
        (pos.repeat_interleave(c.split_tokens) - 1)[None] if c.fusion_causal else None,
    )
    unit_lengths = torch.full((B,), units.shape[1], device=states.device)
    frames, lengths = uniform_upsample(fused, n, c.upsample_factor, unit_lengths)
    hidden = decoder.run_decoder(frames, lengths)
    if vocab_logits:  # Qwen2ForCausalLM forms its text logits on every frame; OpenOmni drops them
        wasted = F.linear(hidden, decoder.decoder.embed_tokens.weight.new_zeros(TEXT_VOCAB_HEAD, c.width))
        del wasted
    log_probs = F.log_softmax(decoder.head(hidden).float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(log_probs, units, lengths, unit_lengths, blank=c.units, reduction="none", zero_infinity=True)


def _rlsiat(module, queries, context, context_mask, groups):
    """OpenOmni's RLSIAT: per layer, cross-attention with an explicit einsum, masked softmax and
    einsum (``CrossAttention``), then the feed-forward, both residual; then a LayerNorm."""
    mask = context_mask[:, None, :]
    if groups is not None:
        mask = mask & (groups[:, None, :] <= torch.arange(queries.shape[1], device=queries.device)[None, :, None])
    for layer in module.layers:
        a = layer.attn
        B, Nq, _ = queries.shape
        q = a.to_q(a.norm_query(queries)) * a.head_dim**-0.5
        k, v = a.to_kv(a.norm_context(context)).chunk(2, dim=-1)
        q, k, v = (t.view(B, t.shape[1], a.heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q, k).masked_fill(~mask[:, None], float("-inf"))
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
        queries = queries + a.to_out(out.transpose(1, 2).reshape(B, Nq, -1))
        queries = queries + layer.ff(queries)
    return module.norm(queries)


class OpenOmniRecipeLoss(nn.Module):
    """Stage 4 or 5 the OpenOmni way (see the module docstring). ``vocab_logits``: form the
    unused text-vocabulary logits (LLM and decoder); ``blank_media``: run the encoders on blank
    inputs every record; ``checkpointing``: recompute the decoder layers in the backward."""

    def __init__(
        self,
        model: OmniModel,
        stage: Stage,
        beta: float = 0.1,
        vocab_logits: bool = True,
        blank_media: bool = True,
        checkpointing: bool = True,
    ):
        super().__init__()
        self.model, self.stage, self.beta = model, stage, beta
        self.vocab_logits, self.blank_media = vocab_logits, blank_media
        if checkpointing:
            decoder = model.speech_decoder.decoder
            (getattr(decoder, "activation_checkpointing_enable", None) or decoder.gradient_checkpointing_enable)()
        reference = copy.deepcopy(model.speech_decoder).requires_grad_(False).eval() if stage.loss == "dpo" else None
        self._reference = [reference]  # not a submodule

    def _blank_media(self, batch: int, device) -> None:
        """CLIP on a blank image and Whisper on a silent 30-s mel per record (frozen: no grad)."""
        c = self.model.config
        pixels = torch.zeros(batch, 3, c.image_size, c.image_size, device=device)
        mel = torch.zeros(batch, c.speech["num_mel_bins"], 2 * c.speech["max_source_positions"], device=device)
        self.model.encode_images(pixels)
        self.model.encode_speech(mel)

    def forward(self, batch: Dict[str, object]) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        with torch.no_grad():
            if self.blank_media:
                self._blank_media(batch["input_ids"].shape[0], batch["input_ids"].device)
            hidden = self.model(**inputs, text_loss=False).hidden_states
            if self.vocab_logits:  # the frozen LLM's own forward forms its text logits (labels given)
                del_me = self.model.llm.lm_head(hidden)
                del del_me
        states, tokens, mask = response_states(hidden, batch["labels"])
        decoder, units = self.model.speech_decoder, batch["units"]
        if self.stage.loss == "speech":
            nll = openomni_generator_nll(decoder, states, tokens, mask, units, self.vocab_logits)
            return nll.sum() / (units.shape[0] * units.shape[1])
        rejected = batch["rejected_units"]
        per_unit = 1.0 / units.shape[1]
        win = -openomni_generator_nll(decoder, states, tokens, mask, units, self.vocab_logits) * per_unit
        lose = -openomni_generator_nll(decoder, states, tokens, mask, rejected, self.vocab_logits) * per_unit
        with torch.no_grad():
            reference = self._reference[0]
            win_ref = -openomni_generator_nll(reference, states, tokens, mask, units, self.vocab_logits) * per_unit
            lose_ref = -openomni_generator_nll(reference, states, tokens, mask, rejected, self.vocab_logits) * per_unit
        logits = (win - lose) - (win_ref - lose_ref)
        return -F.logsigmoid(self.beta * logits).mean()
