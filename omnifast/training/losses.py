"""Each stage's loss on a micro-batch: next-token cross-entropy (stages 1-3), the speech
decoder's loss on the frozen LLM's response states (stage 4), CTC-DPO against the frozen
reference decoder's log-likelihoods (stage 5)."""
from __future__ import annotations

from typing import Dict

import torch

from omnifast.models import response_states

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "speech_features")


def stage_loss(trainer, batch: Dict[str, object]) -> torch.Tensor:
    """The loss of ``trainer.stage`` on ``batch`` (a collated micro-batch on the device)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    if trainer.stage.loss == "text":
        return trainer.wrapped(**inputs).text_loss
    if trainer.stage.loss == "speech":
        return trainer.wrapped(**inputs, units=batch["units"], text_loss=False).speech_loss
    with torch.no_grad():
        hidden = trainer.wrapped(**inputs, text_loss=False).hidden_states
    states, tokens, mask = response_states(hidden, batch["labels"])
    ref_chosen, ref_rejected = reference_logps(trainer, batch, states, tokens, mask)
    out = trainer.model.speech_decoder.dpo_loss(states, tokens, batch["units"], batch["rejected_units"], ref_chosen,
                                                ref_rejected, beta=trainer.config.beta, hidden_mask=mask,
                                                text_mask=mask, sft_weight=trainer.config.sft_weight)
    return out.loss


def reference_logps(trainer, batch, states, tokens, mask):
    """The frozen reference's log-likelihoods of each record's chosen and rejected units,
    computed the first time a record is seen and kept in ``trainer.ref_cache``."""
    cache = trainer.ref_cache
    missing = [i for i, rid in enumerate(batch["ids"]) if rid not in cache]
    if missing:
        chosen, rejected = trainer.reference.reference_logps(states, tokens, batch["units"], batch["rejected_units"],
                                                             hidden_mask=mask, text_mask=mask)
        for i in missing:
            cache[batch["ids"][i]] = (chosen[i].item(), rejected[i].item())
    values = torch.tensor([cache[rid] for rid in batch["ids"]], device=states.device, dtype=torch.float32)
    return values[:, 0], values[:, 1]
