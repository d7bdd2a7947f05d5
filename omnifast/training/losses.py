"""Each stage's loss on a micro-batch, as a module (what DDP and FSDP wrap, so the whole loss runs
inside one forward): next-token cross-entropy (stages 1-3), the speech decoder's loss on the
frozen LLM's response states (stage 4), CTC-DPO against the frozen reference decoder's
log-likelihoods (stage 5), the speech encoder's CTC (speech-pretrain). ``CachedStageLoss`` is
stages 4 and 5 on states read from a state cache: it holds only the speech decoder.

After each forward, ``step_metrics`` holds the micro-batch's figures besides the loss (CTC-DPO:
TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, means over the pairs), as detached tensors."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from omnifast.models import OmniModel, response_states
from omnifast.models.processor import IGNORE_INDEX
from omnifast.nn.packing import unpack

from .cache import reference_key
from .references import ReferenceLogpCache
from .stages import Stage

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "speech_features")


class StageLoss(nn.Module):
    """``forward(batch) -> loss`` of ``stage`` for ``model``. Stage 5 reads the reference's
    log-likelihoods from ``references`` and computes those it lacks with ``reference`` (the
    frozen decoder the stage starts from), once per record."""

    def __init__(
        self,
        model: OmniModel,
        stage: Stage,
        beta: float = 0.1,
        sft_weight: float = 0.0,
        references: Optional[ReferenceLogpCache] = None,
        reference: Optional[nn.Module] = None,
        dpo_normalization: str = "sum",
        special_ids: Sequence[int] = (),
    ):
        super().__init__()
        self.model, self.stage, self.beta, self.sft_weight = model, stage, beta, sft_weight
        self.special_ids = tuple(special_ids)  # dropped from a transcript's CTC targets (the end of turn)
        self.dpo_normalization = dpo_normalization
        self.references = references
        self._reference: List[nn.Module] = [reference] if reference is not None else []  # not a submodule
        self.step_metrics: Dict[str, torch.Tensor] = {}

    def response_inputs(self, batch: Dict[str, object]):
        """The frozen front's (states, tokens, mask) at the response positions of a padded batch."""
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        with torch.no_grad():
            hidden = self.model(**inputs, text_loss=False).hidden_states
        return response_states(hidden, batch["labels"])

    def forward(self, batch: Dict[str, object]) -> torch.Tensor:
        self.step_metrics = {}
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        inputs["lengths"] = batch.get("lengths")  # a packed batch
        if self.stage.loss == "text":
            return self.model(**inputs).text_loss
        if self.stage.loss == "ctc":
            return self.model.speech_ctc_loss(
                batch["speech_features"], batch["labels"], self.special_ids, batch.get("speech_lengths")
            )
        if self.stage.loss == "speech":
            return self.model(**inputs, units=batch["units"], text_loss=False).speech_loss
        with torch.no_grad():
            hidden = self.model(**inputs, text_loss=False).hidden_states  # padded, packed or not
        labels = batch["labels"]
        if inputs["lengths"] is not None:
            labels = unpack(labels[0] - IGNORE_INDEX, inputs["lengths"]) + IGNORE_INDEX
        states, tokens, mask = response_states(hidden, labels)
        ref_chosen, ref_rejected = self.reference_logps(batch, states, tokens, mask)
        return dpo_loss(
            self.model.speech_decoder,
            states,
            tokens,
            mask,
            batch,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.sft_weight,
            self.dpo_normalization,
            self.step_metrics,
        )

    def reference_logps(self, batch, states, tokens, mask):
        keys = [
            reference_key(rid, spoken)
            for rid, spoken in zip(batch["ids"], batch.get("spoken") or [False] * len(batch["ids"]))
        ]
        missing = [i for i, key in enumerate(keys) if key not in self.references]
        if missing:
            chosen, rejected = self._reference[0].reference_logps(
                states,
                tokens,
                batch["units"],
                batch["rejected_units"],
                hidden_mask=mask,
                text_mask=mask,
                normalization=self.dpo_normalization,
            )
            self.references.add([keys[i] for i in missing], chosen[missing], rejected[missing])
        return self.references.lookup(keys, device=states.device)


def dpo_loss(
    decoder,
    states,
    tokens,
    mask,
    batch,
    ref_chosen,
    ref_rejected,
    beta,
    sft_weight,
    normalization,
    metrics: Dict[str, torch.Tensor],
) -> torch.Tensor:
    out = decoder.dpo_loss(
        states,
        tokens,
        batch["units"],
        batch["rejected_units"],
        ref_chosen,
        ref_rejected,
        beta=beta,
        hidden_mask=mask,
        text_mask=mask,
        sft_weight=sft_weight,
        normalization=normalization,
    )
    metrics.clear()
    metrics.update(dpo_metrics(out))
    return out.loss


def dpo_metrics(out) -> Dict[str, torch.Tensor]:
    """TRL's names for a :class:`~omnifast.ops.dpo.DPOOutput` (means over the pairs)."""
    found = {
        "rewards/margins": out.reward_margins,
        "rewards/accuracies": out.reward_accuracy,
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "logps/chosen": out.policy_chosen_logps,
        "logps/rejected": out.policy_rejected_logps,
    }
    return {name: value.detach().float().mean() for name, value in found.items() if value is not None}


class CachedStageLoss(nn.Module):
    """Stages 4 and 5 on a batch of cached states (``cache.collate_cached``): the same decoder
    calls as :class:`StageLoss` after the frozen front, without it."""

    def __init__(
        self,
        decoder: nn.Module,
        stage: Stage,
        beta: float = 0.1,
        sft_weight: float = 0.0,
        references: Optional[ReferenceLogpCache] = None,
        dpo_normalization: str = "sum",
    ):
        super().__init__()
        self.decoder, self.stage, self.beta, self.sft_weight, self.references = (
            decoder,
            stage,
            beta,
            sft_weight,
            references,
        )
        self.dpo_normalization = dpo_normalization
        self.step_metrics: Dict[str, torch.Tensor] = {}

    @staticmethod
    def response_inputs(batch: Dict[str, object]):
        return batch["states"], batch["tokens"], batch["mask"]

    def forward(self, batch: Dict[str, object]) -> torch.Tensor:
        self.step_metrics = {}
        states, tokens, mask = batch["states"], batch["tokens"], batch["mask"]
        if self.stage.loss == "speech":
            return self.decoder(states, tokens, mask, mask, batch["units"]).loss
        keys = [reference_key(rid, spoken) for rid, spoken in zip(batch["ids"], batch["spoken"])]
        ref_chosen, ref_rejected = self.references.lookup(keys, device=states.device)
        return dpo_loss(
            self.decoder,
            states,
            tokens,
            mask,
            batch,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.sft_weight,
            self.dpo_normalization,
            self.step_metrics,
        )
