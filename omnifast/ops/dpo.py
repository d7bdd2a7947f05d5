"""The DPO objective (Rafailov et al., 2023) as a function of four log-likelihoods, whatever model
produced them (a CTC head, an autoregressive head): the loss is the mean over pairs of
``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))``, with TRL's metrics beside it.

How a sequence's log-likelihood is normalised is a choice (``NORMALIZATIONS``):
* ``"sum"``: the log-likelihood itself, one value per pair;
* ``"length"``: divided by the sequence's length, one value per pair;
* ``"openomni"``: OpenOmni's, one value per batch and side: the batch's summed log-likelihood over
  its summed lengths (its DPO calls the speech generator's loss, sum / total units, per side).
It applies alike to the policy and the reference (``normalize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("sum", "length", "openomni")


@dataclass
class DPOOutput:
    """The loss and TRL-style metrics. Rewards are beta * (logpi - logref) per pair (per batch
    for ``"openomni"``)."""

    loss: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracy: torch.Tensor
    chosen_rewards: Optional[torch.Tensor]
    rejected_rewards: Optional[torch.Tensor]
    policy_chosen_logps: Optional[torch.Tensor]
    policy_rejected_logps: Optional[torch.Tensor]


def check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    return normalization


def normalize(log_likelihoods: torch.Tensor, lengths: torch.Tensor, normalization: str) -> torch.Tensor:
    """(B,) log-likelihoods -> the values DPO compares: (B,) for "sum" and "length", (1,) for
    "openomni"."""
    check_normalization(normalization)
    lengths = lengths.to(log_likelihoods.device, log_likelihoods.dtype)
    if normalization == "sum":
        return log_likelihoods
    if normalization == "length":
        return log_likelihoods / lengths.clamp(min=1)
    return (log_likelihoods.sum() / lengths.sum().clamp(min=1)).reshape(1)


def pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
):
    """The DPO formula, per pair: ``(-log sigmoid(margin), chosen rewards, rejected rewards)`` with
    rewards beta * (pi - ref) and margin = chosen - rejected, each side already normalised.
    Differentiable in the policy values (ops with a fused backward take their coefficients from it
    by autograd)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen.to(policy_chosen))
    rejected_rewards = beta * (policy_rejected - ref_rejected.to(policy_rejected))
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def dpo_from_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    sft_nll: Optional[torch.Tensor] = None,
    sft_weight: float = 0.0,
) -> DPOOutput:
    """DPO of already-normalised log-likelihoods (see :func:`normalize`); ``sft_nll`` (a scalar,
    e.g. the chosen units' NLL per unit) is added with ``sft_weight``. Gradients flow to the
    policy values."""
    from .checks import check_number

    check_number("beta", beta, positive=True)
    check_number("sft_weight", sft_weight, low=0.0)
    losses, chosen_rewards, rejected_rewards = pair_losses(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    margins = chosen_rewards - rejected_rewards
    loss = losses.mean()
    if sft_weight and sft_nll is not None:
        loss = loss + sft_weight * sft_nll
    return DPOOutput(
        loss,
        margins.detach(),
        (margins > 0).float().mean().detach(),
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        policy_chosen.detach(),
        policy_rejected.detach(),
    )
