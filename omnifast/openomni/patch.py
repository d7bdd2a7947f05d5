"""omnifast's fused ops inside OpenOmni's own training code, in the manner of Liger-Kernel's
``apply_liger_kernel_to_*``: ``omnifast.openomni.patch(model)`` swaps, on a live OpenOmni model,
the speech generator's work for omnifast's, keeping its weights, its module names, and its
forward's arguments and outputs:

* the dense MoE ``input_proj`` (a Python loop over experts stacking every output) becomes two
  GEMMs over all experts at once, the gate folded in between;
* ``SpeechGeneratorCTC.forward`` no longer forms the decoder's 151,936-word vocabulary logits it
  drops, nor the full (B, T, V) unit logits and their log-softmax: its CTC loss is the fused
  linear-CTC (``omnifast.linear_ctc_loss``) on the ``llm_decoder`` weights;
* its DPO's chosen and rejected calls share their front end (MoE and text-guided module run once
  for both, with one graph), each keeping its own upsampling as OpenOmni's does.
The loss and every gradient are OpenOmni's (to float64 precision; tested on modules rebuilt from
its code). Works on ``SpeechGeneratorCTC`` objects found under ``model.get_model()`` (or the
model) as ``speech_generator`` and ``copy_speech_generator``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from omnifast.constants import IGNORE_INDEX
from omnifast.ops import linear_ctc_loss

GENERATORS = ("speech_generator", "copy_speech_generator")


def patch(model):
    """Patch an OpenOmni model (or one of its speech generators) in place; returns it."""
    inner = model.get_model() if hasattr(model, "get_model") else model
    found = [getattr(inner, name) for name in GENERATORS if getattr(inner, name, None) is not None]
    if not found and all(hasattr(model, a) for a in ("input_proj", "fusion", "llm_decoder")):
        found = [model]
    if not found:
        raise ValueError(
            "no OpenOmni speech generator (speech_generator / copy_speech_generator, with input_proj, "
            "fusion and llm_decoder) on this model"
        )
    for generator in found:
        patch_generator(generator)
    return model


def patch_generator(generator) -> None:
    for name in ("input_proj", "fusion", "llm_decoder", "llm", "llm_embedding", "upsample"):
        if not hasattr(generator, name):
            raise ValueError(f"not an OpenOmni SpeechGeneratorCTC: it has no {name!r}")
    generator.input_proj.forward = types.MethodType(_dense_moe, generator.input_proj)
    generator.forward = types.MethodType(_generator_forward, generator)
    generator._omnifast_front = None


def _dense_moe(self, x: torch.Tensor) -> torch.Tensor:
    """OpenOmni's ``MoE.forward`` (softmax gate, every expert, weighted sum) as two GEMMs."""
    B, N, D = x.shape
    flat = x.reshape(-1, D)
    gate = torch.softmax(F.linear(flat, self.gate.fc.weight, self.gate.fc.bias), -1)  # (R, E)
    w1 = torch.cat([e.fc1.weight for e in self.experts])  # (E*F, D)
    b1 = torch.cat([e.fc1.bias for e in self.experts])
    hidden = F.relu(F.linear(flat, w1, b1))  # (R, E*F)
    E, width = len(self.experts), self.experts[0].fc2.weight.shape[0]
    weighted = (hidden.view(-1, E, hidden.shape[1] // E) * gate[..., None]).reshape(hidden.shape)
    w2 = torch.cat([e.fc2.weight for e in self.experts], dim=1)  # (O, E*F)
    b2 = torch.stack([e.fc2.bias for e in self.experts])  # (E, O)
    return (F.linear(weighted, w2) + gate @ b2).view(B, N, width)


def _front(self, text_reps, text_labels, text_tokens):
    """MoE + text-guided module, as OpenOmni computes them; reused by the next call with the
    same (unchanged) inputs before any backward (DPO scores chosen and rejected on one front
    end)."""
    memo = self._omnifast_front
    inputs = (text_reps, text_labels, text_tokens)
    if memo is not None and all(a is b for a, b in zip(memo[0], inputs)) and memo[1] == _versions(inputs):
        self._omnifast_front = None
        return memo[2]
    sos = self.llm_embedding.weight[self.sos_eos]
    task = self.llm_embedding.weight[self.task_id]
    reps = [
        torch.cat([sos[None], rep[label != IGNORE_INDEX], task[None]]) for rep, label in zip(text_reps, text_labels)
    ]
    split = 4
    lengths = torch.tensor([len(r) * split for r in reps], device=reps[0].device)
    key_mask = torch.arange(int(lengths.max()), device=lengths.device)[None] < lengths[:, None]
    context = self.input_proj(torch.nn.utils.rnn.pad_sequence(reps, batch_first=True))
    B, N, O = context.shape
    context = context.view(B, N, O // split, split).transpose(2, 3).reshape(B, N * split, O // split)
    text_lengths = text_tokens.ne(IGNORE_INDEX).long().sum(-1)
    text = torch.nn.utils.rnn.pad_sequence(
        [t[t.ne(IGNORE_INDEX)] for t in text_tokens], batch_first=True, padding_value=0
    )
    fused = self.fusion(context, self.llm.model.model.embed_tokens(text), key_mask, None)
    result = [f[:n] for n, f in zip(text_lengths, fused)]
    self._omnifast_front = (inputs, _versions(inputs), result)
    if fused.requires_grad:  # a backward frees the graph: the next call computes its own front
        fused.register_hook(lambda grad: setattr(self, "_omnifast_front", None))
    return result


def _versions(tensors):
    return tuple(t._version for t in tensors)


def _generator_forward(self, text_reps, text_labels, speech_tokens, text_tokens=None, embedding=None):
    """``SpeechGeneratorCTC.forward``: the CTC loss summed over the batch over its total units."""
    fused = _front(self, text_reps, text_labels, text_tokens)
    frames, attention_mask, position_ids = self.upsample(fused, speech_tokens)
    hidden = self.llm.model.model(
        inputs_embeds=frames, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # no vocabulary logits
    lengths = speech_tokens.ne(IGNORE_INDEX).long().sum(-1)
    loss = linear_ctc_loss(
        hidden,
        self.llm_decoder.weight,
        self.llm_decoder.bias,
        speech_tokens.clamp(min=0),
        attention_mask.long().sum(-1),
        lengths,
        self.unit_vocab_size,
        "sum",
        True,
    )
    return loss / lengths.sum()
