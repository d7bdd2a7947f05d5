"""CTC-DPO: direct preference optimisation of a CTC speech head, chosen and rejected unit
sequences scored against one emission sequence in one policy forward.

loss = mean_b -log sigmoid(beta * ((logpi_w - logref_w) - (logpi_l - logref_l)))
       [+ sft_weight * mean_b CTC-NLL(chosen_b) / max(L_w, 1)]

logpi is the CTC log-likelihood of the units under the head's emissions, optionally divided by
the number of units (``length_normalize``, OpenOmni's recipe). The reference values are
computed once by a frozen head (:func:`reference_logps`, :class:`ReferenceLogpCache`).

Two ways to the same loss:
- dense: the fused linear-CTC passes (full-vocabulary log-softmax) for both sequences;
- sparse (no length normalisation, no SFT term): chosen and rejected share frames and input
  length, so the per-frame log-sum-exp cancels in logpi_w - logpi_l. Only the logits of the
  columns {blank} U chosen U rejected of each pair are needed: cost T x K x D instead of
  T x V x D, the gradient scattered into those rows of the weight. The individual rewards need
  the normaliser; they are reported only with ``exact_rewards=True`` (one extra no-grad
  full-vocabulary pass), while margins, accuracy and the loss are always exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import check_int, check_tensor, ctc_targets
from ._dispatch import choose_backend, ctc_kernel
from ._reference import accumulation_dtype
from .linear_ctc import Scorer, check_chunk_frames, check_linear_head, make_target_set


@dataclass
class CTCDPOOutput:
    """The loss and TRL-style metrics. Rewards are beta * (logpi - logref) per pair."""
    loss: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracy: torch.Tensor
    chosen_rewards: Optional[torch.Tensor]
    rejected_rewards: Optional[torch.Tensor]
    policy_chosen_logps: Optional[torch.Tensor]
    policy_rejected_logps: Optional[torch.Tensor]


def _normalise(ll, lengths, length_normalize):
    return ll / lengths.clamp(min=1).to(ll.dtype) if length_normalize else ll


def _dense_scores(hidden, weight, bias, input_lengths, sets, blank, chunk_frames, backend, want_grad):
    """log p of each target set through the fused linear-CTC passes, and a function of the
    coefficients of -log p that returns (grad_hidden, grad_weight, grad_bias)."""
    scorer = Scorer(hidden, weight, bias, input_lengths, sets, blank, chunk_frames, backend)
    lls = scorer.log_likelihoods(want_occupancy=want_grad)
    return lls, scorer.gradients


def _pair_columns(blank, sets, V):
    """Per pair, the distinct columns {blank} U labels (blank first), padded with blank, and
    each set's targets mapped to positions among them."""
    B = sets[0].targets.shape[0]
    device = sets[0].targets.device
    columns, locals_ = [], [torch.zeros_like(s.targets) for s in sets]
    for b in range(B):
        used = [s.targets[b, : int(s.lengths[b])] for s in sets]
        distinct = torch.unique(torch.cat(used)) if used else torch.empty(0, dtype=torch.long, device=device)
        columns.append(torch.cat([torch.tensor([blank], device=device), distinct]))
        for k, labels in enumerate(used):
            locals_[k][b, : labels.numel()] = torch.searchsorted(distinct, labels) + 1
    K = max(c.numel() for c in columns)
    padded = torch.full((B, K), blank, dtype=torch.long, device=device)
    for b, c in enumerate(columns):
        padded[b, : c.numel()] = c
    return padded, locals_


def _sparse_scores(hidden, weight, bias, input_lengths, sets, blank, backend, want_grad):
    """Unnormalised log-scores (log p + sum_t logsumexp_t) of each target set from the logits
    of each pair's own columns only, and their gradient function."""
    acc = accumulation_dtype(hidden.dtype)
    columns, local_targets = _pair_columns(blank, sets, weight.shape[0])
    w_sub = weight.to(acc)[columns]                                  # (B, K, D)
    h = hidden.to(acc)
    logits = torch.bmm(h, w_sub.transpose(1, 2))                      # (B, T, K)
    if bias is not None:
        logits = logits + bias.to(acc)[columns][:, None, :]
    scores = logits.transpose(0, 1).contiguous()                      # (T, B, K), blank at column 0
    kernel = ctc_kernel(backend)
    ones = torch.ones(hidden.shape[0], dtype=acc, device=hidden.device) if want_grad else None
    results = [kernel(scores, t, input_lengths, s.lengths, 0, False, ones, False)
               for t, s in zip(local_targets, sets)]
    lls = [-nll for nll, _ in results]

    def gradients(coefs, poison, needs=(True, True, True)):
        # d(sum_k coef_k * -score_k)/d logits = sum_k coef_k * (-gamma_k); kernel grads are -gamma.
        grad_scores = sum(torch.where(torch.isinf(nll)[None, :, None], 0.0, c.to(acc)[None, :, None] * g)
                          for c, (nll, g) in zip(coefs, results))
        frames = torch.arange(scores.shape[0], device=scores.device)[:, None] < input_lengths
        grad_scores = torch.where((poison & frames)[..., None], float("nan"), grad_scores)
        grad_logits = grad_scores.transpose(0, 1)                     # (B, T, K)
        grad_hidden = torch.bmm(grad_logits, w_sub) if needs[0] else None
        grad_weight = grad_bias = None
        if needs[1]:
            grad_weight = torch.zeros_like(weight, dtype=acc).index_add_(
                0, columns.flatten(), torch.bmm(grad_logits.transpose(1, 2), h).flatten(0, 1))
        if needs[2] and bias is not None:
            grad_bias = torch.zeros_like(bias, dtype=acc).index_add_(0, columns.flatten(), grad_logits.sum(1).flatten())
        return grad_hidden, grad_weight, grad_bias

    return lls, gradients


def _frame_normaliser(hidden, weight, bias, input_lengths, chunk_frames, backend):
    """sum_t logsumexp of the full-vocabulary logits over each sequence's frames (no grad)."""
    with torch.no_grad():
        empty = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
        lengths = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        scorer = Scorer(hidden, weight, bias, input_lengths, [make_target_set(empty, lengths, 0)], 0,
                        chunk_frames, backend)
        scorer.log_likelihoods(want_occupancy=False)
        return scorer.lse.sum(1)


class _CTCDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, sets, input_lengths, ref_chosen, ref_rejected, beta,
                length_normalize, sft_weight, zero_infinity, sparse, exact_rewards, blank, chunk_frames, backend):
        needs = tuple(ctx.needs_input_grad[:3])
        want_grad = any(needs)
        if sparse:
            (ll_w, ll_l), gradients = _sparse_scores(hidden, weight, bias, input_lengths, sets, blank, backend,
                                                     want_grad)
        else:
            (ll_w, ll_l), gradients = _dense_scores(hidden, weight, bias, input_lengths, sets, blank,
                                                    chunk_frames, backend, want_grad)
        chosen, rejected = sets
        acc = ll_w.dtype
        pw = _normalise(ll_w, chosen.lengths, length_normalize)
        pl = _normalise(ll_l, rejected.lengths, length_normalize)
        ref_w, ref_l = ref_chosen.to(acc), ref_rejected.to(acc)
        margin_logits = (pw - ref_w) - (pl - ref_l)  # in sparse mode the normalisers cancel here
        z = beta * margin_logits
        infeasible = (ll_w == float("-inf")) | (ll_l == float("-inf"))
        B = z.numel()
        per_pair = -F.logsigmoid(z)
        nll_w = -ll_w / chosen.lengths.clamp(min=1).to(acc)
        if sft_weight:
            per_pair = per_pair + sft_weight * nll_w
        if zero_infinity:
            per_pair = per_pair.masked_fill(infeasible, 0.0)
        loss = per_pair.mean()

        if sparse and exact_rewards:
            norm = _frame_normaliser(hidden, weight, bias, input_lengths, chunk_frames, backend)
            pw, pl = pw - norm, pl - norm
        rewards_known = not sparse or exact_rewards
        chosen_rewards = beta * (pw - ref_w) if rewards_known else None
        rejected_rewards = beta * (pl - ref_l) if rewards_known else None
        margins = z.detach()
        accuracy = (margins > 0).to(acc).mean()

        if want_grad:
            # d loss / d ll_w and d ll_l; the scorer takes coefficients of -ll.
            dz = -torch.sigmoid(-z) / B
            d_w = dz * beta * (1.0 / chosen.lengths.clamp(min=1).to(acc) if length_normalize else 1.0)
            d_l = -dz * beta * (1.0 / rejected.lengths.clamp(min=1).to(acc) if length_normalize else 1.0)
            if sft_weight:
                d_w = d_w - sft_weight / (B * chosen.lengths.clamp(min=1).to(acc))
            poison = torch.zeros_like(infeasible) if zero_infinity else infeasible
            d_w, d_l = d_w.masked_fill(infeasible, 0.0), d_l.masked_fill(infeasible, 0.0)
            grads = gradients([-d_w, -d_l], poison.contiguous(), needs)
            ctx.grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
        outputs = [loss, margins, accuracy]
        for extra in (chosen_rewards, rejected_rewards, pw if rewards_known else None, pl if rewards_known else None):
            outputs.append(extra if extra is not None else torch.empty(0, dtype=acc, device=loss.device))
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.rewards_known = rewards_known
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):
        grads = tuple(None if g is None else (g if bool(grad_loss == 1) else g * grad_loss.to(g.dtype))
                      for g in ctx.grads)
        return grads + (None,) * 14


def ctc_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 chosen: torch.Tensor, rejected: torch.Tensor, input_lengths, chosen_lengths, rejected_lengths,
                 ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
                 length_normalize: bool = False, sft_weight: float = 0.0, blank: Optional[int] = None,
                 zero_infinity: bool = False, sparse: Optional[bool] = None, exact_rewards: bool = False,
                 chunk_frames: Optional[int] = None, backend: Optional[str] = None) -> CTCDPOOutput:
    """CTC-DPO loss of a linear CTC head over decoder states (see the module docstring).

    Args:
        hidden: (B, T, D) policy decoder states; weight (V, D), bias (V,) or None: the head.
        chosen, rejected: unit sequences, padded (B, S) or concatenated 1-D, with
            ``chosen_lengths`` / ``rejected_lengths``; both pair members share ``input_lengths``.
        ref_chosen_logps, ref_rejected_logps: (B,) finite log-likelihoods of the frozen
            reference, computed with the same ``length_normalize`` (:func:`reference_logps`).
        beta: DPO temperature (> 0). length_normalize: divide log-likelihoods by the unit count.
        sft_weight: weight of the chosen CTC NLL (per unit) added to the loss.
        blank: the blank index (default V - 1). zero_infinity: infeasible pairs add 0 loss and
            0 gradient (else inf/NaN).
        sparse: use the column-subset path (default: whenever it applies, i.e. no length
            normalisation and no SFT term). exact_rewards: in the sparse path, also compute the
            individual rewards (one no-grad full-vocabulary pass).
    """
    check_linear_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    blank = V - 1 if blank is None else check_int("blank", blank)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if isinstance(sft_weight, bool) or not isinstance(sft_weight, (int, float)) or sft_weight < 0:
        raise ValueError(f"sft_weight must be a number >= 0, got {sft_weight!r}")
    for name, flag in (("length_normalize", length_normalize), ("zero_infinity", zero_infinity),
                       ("exact_rewards", exact_rewards)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_chunk_frames(chunk_frames)
    sets = []
    input_lengths_checked = None
    for prefix, targets, lengths in (("chosen", chosen, chosen_lengths), ("rejected", rejected, rejected_lengths)):
        if isinstance(targets, torch.Tensor) and targets.dim() == 2 and targets.shape[0] != B:
            raise ValueError(f"{prefix} has batch size {targets.shape[0]} but hidden has {B}")
        padded, input_lengths_checked, lengths = ctc_targets(
            targets, input_lengths, lengths, blank, T=T, B=B, C=V, device=hidden.device, name="hidden",
            targets_name=prefix, lengths_name=f"{prefix}_lengths")
        sets.append(make_target_set(padded, lengths, blank))
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_tensor(name, ref, floating=True)
        if ref.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},), one value per pair, got {tuple(ref.shape)}")
        if not bool(torch.isfinite(ref).all()):
            raise ValueError(f"{name} must be finite, got {ref.tolist()}")
    dense_only = length_normalize or sft_weight > 0
    if sparse is None:
        sparse = not dense_only
    elif sparse and dense_only:
        raise ValueError("sparse=True needs length_normalize=False and sft_weight=0: "
                         "the per-frame normaliser only cancels without them")
    chosen_backend = choose_backend(hidden.device, backend)
    out = _CTCDPOFunction.apply(hidden, weight, bias, sets, input_lengths_checked,
                                ref_chosen_logps.to(hidden.device), ref_rejected_logps.to(hidden.device),
                                float(beta), length_normalize, float(sft_weight), zero_infinity, sparse,
                                exact_rewards, blank, chunk_frames, chosen_backend)
    loss, margins, accuracy, cr, rr, pw, pl = out
    known = cr.numel() > 0 or B == 0
    return CTCDPOOutput(loss, margins, accuracy, cr if known else None, rr if known else None,
                        pw if known else None, pl if known else None)


@torch.no_grad()
def reference_logps(hidden, weight, bias, chosen, rejected, input_lengths, chosen_lengths, rejected_lengths,
                    *, length_normalize: bool = False, blank: Optional[int] = None,
                    chunk_frames: Optional[int] = None, backend: Optional[str] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's log-likelihoods of chosen and rejected, (B,) each, in one pass
    over the reference head's logits (no grad)."""
    check_linear_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    blank = V - 1 if blank is None else check_int("blank", blank)
    sets, in_len = [], None
    for prefix, targets, lengths in (("chosen", chosen, chosen_lengths), ("rejected", rejected, rejected_lengths)):
        padded, in_len, lengths = ctc_targets(targets, input_lengths, lengths, blank, T=T, B=B, C=V,
                                              device=hidden.device, name="hidden", targets_name=prefix,
                                              lengths_name=f"{prefix}_lengths")
        sets.append(make_target_set(padded, lengths, blank))
    scorer = Scorer(hidden, weight, bias, in_len, sets, blank, chunk_frames, choose_backend(hidden.device, backend))
    ll_w, ll_l = scorer.log_likelihoods(want_occupancy=False)
    return (_normalise(ll_w, sets[0].lengths, length_normalize),
            _normalise(ll_l, sets[1].lengths, length_normalize))


class ReferenceLogpCache:
    """Reference log-likelihoods keyed by example id, kept in one tensor file.

    ``build`` runs a frozen reference over the data once; later epochs ``lookup`` the values.
    Saving writes a temporary file and renames it, so a crash never leaves a torn cache."""

    def __init__(self, path: str):
        self.path = str(path)
        self.values: Dict[str, Tuple[float, float]] = {}
        if os.path.exists(self.path):
            stored = torch.load(self.path, weights_only=True)
            self.values = {key: (float(w), float(l)) for key, w, l in
                           zip(stored["ids"], stored["chosen"].tolist(), stored["rejected"].tolist())}

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, key) -> bool:
        return str(key) in self.values

    def add(self, ids: Sequence, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for key, w, l in zip(ids, chosen.tolist(), rejected.tolist()):
            self.values[str(key)] = (w, l)

    def lookup(self, ids: Sequence, device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ids if str(key) not in self.values]
        if missing:
            raise KeyError(f"no reference log-likelihoods cached for ids {missing[:5]} (of {len(missing)})")
        pairs = torch.tensor([self.values[str(key)] for key in ids], dtype=dtype, device=device)
        return pairs[:, 0], pairs[:, 1]

    def save(self) -> None:
        ids = list(self.values)
        payload = {"ids": ids, "chosen": torch.tensor([self.values[k][0] for k in ids], dtype=torch.float64),
                   "rejected": torch.tensor([self.values[k][1] for k in ids], dtype=torch.float64)}
        tmp = f"{self.path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    @classmethod
    def build(cls, path: str, batches: Iterable[dict], weight, bias, **options) -> "ReferenceLogpCache":
        """``batches`` yield dicts with ``ids``, ``hidden`` (the frozen reference decoder's
        states), ``chosen``, ``rejected``, ``input_lengths``, ``chosen_lengths`` and
        ``rejected_lengths``; ``options`` go to :func:`reference_logps`. Already cached ids are
        skipped; the file is saved at the end."""
        cache = cls(path)
        for batch in batches:
            if all(str(key) in cache.values for key in batch["ids"]):
                continue
            w, l = reference_logps(batch["hidden"], weight, bias, batch["chosen"], batch["rejected"],
                                   batch["input_lengths"], batch["chosen_lengths"], batch["rejected_lengths"],
                                   **options)
            cache.add(batch["ids"], w, l)
        cache.save()
        return cache
