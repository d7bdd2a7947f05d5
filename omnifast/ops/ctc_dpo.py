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

from ._checks import check_bool, check_int, check_tensor, ctc_targets
from ._dispatch import choose_backend, ctc_kernel
from ._reference import accumulation_dtype
from .linear_ctc import Scorer, check_chunk_frames, check_linear_head, make_target_set


SPARSE_GROUP_ELEMENTS = 1 << 22  # sparse path: pairs per group so their logits stay ~16 MiB


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


def _dense_forward(hidden, weight, bias, input_lengths, sets, blank, chunk_frames, backend, needs, pair_terms):
    """The dense path: log p of both sets through the fused linear-CTC passes, then pass 2 with
    the pairs' coefficients. Returns both log-likelihoods (B,) and the gradients."""
    scorer = Scorer(hidden, weight, bias, input_lengths, sets, blank, chunk_frames, backend)
    ll_w, ll_l = scorer.log_likelihoods(want_occupancy=any(needs))
    grads = (None, None, None)
    if any(needs):
        coef_w, coef_l, poison = pair_terms(torch.arange(ll_w.numel(), device=ll_w.device), ll_w, ll_l)
        grads = scorer.gradients([coef_w, coef_l], poison.contiguous(), needs)
    return (ll_w, ll_l), grads


def _pair_columns(blank, sets, pairs):
    """For the given pairs, the distinct columns {blank} U labels (blank first), padded with
    blank to a common width, and each set's targets mapped to positions among them."""
    device = sets[0].targets.device
    columns, local_targets = [], [torch.zeros_like(s.targets[pairs]) for s in sets]
    for row, b in enumerate(pairs.tolist()):
        used = [s.targets[b, : int(s.lengths[b])] for s in sets]
        distinct = torch.unique(torch.cat(used))
        columns.append(torch.cat([torch.tensor([blank], device=device), distinct]))
        for k, labels in enumerate(used):
            local_targets[k][row, : labels.numel()] = torch.searchsorted(distinct, labels) + 1
    padded = torch.full((len(columns), max(c.numel() for c in columns)), blank, dtype=torch.long, device=device)
    for row, c in enumerate(columns):
        padded[row, : c.numel()] = c
    return padded, local_targets


def _sparse_forward(hidden, weight, bias, input_lengths, sets, blank, backend, needs, pair_terms):
    """The sparse path, a group of pairs at a time: each pair's logits only for its own columns
    {blank} U chosen U rejected, scored as unnormalised log-probabilities (the per-frame
    normaliser cancels in the margin). ``pair_terms(pairs, ll_w, ll_l)`` gives each pair's
    coefficients of -score and poison mask. Returns both scores (B,) and the gradients."""
    acc = accumulation_dtype(hidden.dtype)
    B, T, D = hidden.shape
    w, b_ = weight.to(acc), None if bias is None else bias.to(acc)
    kernel = ctc_kernel(backend)
    want_grad = any(needs)
    grad_hidden = torch.zeros_like(hidden, dtype=acc) if needs[0] else None
    grad_weight = torch.zeros_like(w) if needs[1] else None
    grad_bias = torch.zeros_like(b_) if needs[2] and b_ is not None else None
    scores_w = torch.empty(B, dtype=acc, device=hidden.device)
    scores_l = torch.empty_like(scores_w)
    widest = max(int(s.lengths.max()) for s in sets) if B else 0
    group = max(1, SPARSE_GROUP_ELEMENTS // max(1, T * min(weight.shape[0], 1 + 2 * widest)))
    for start in range(0, B, group):
        pairs = torch.arange(start, min(B, start + group), device=hidden.device)
        columns, local_targets = _pair_columns(blank, sets, pairs)
        G, K = columns.shape
        w_sub = w[columns]                                            # (G, K, D)
        h = hidden[pairs].to(acc)                                     # (G, T, D)
        logits = torch.bmm(h, w_sub.transpose(1, 2))
        if b_ is not None:
            logits += b_[columns][:, None, :]
        logits = logits.transpose(0, 1).contiguous()                  # (T, G, K), blank in column 0
        lengths = input_lengths[pairs]
        ones = torch.ones(G, dtype=acc, device=hidden.device) if want_grad else None
        (nll_w, g_w), (nll_l, g_l) = [kernel(logits, t, lengths, s.lengths[pairs], 0, False, ones, False)
                                      for t, s in zip(local_targets, sets)]
        scores_w[pairs], scores_l[pairs] = -nll_w, -nll_l
        if not want_grad:
            continue
        coef_w, coef_l, poison = pair_terms(pairs, -nll_w, -nll_l)
        del logits
        # d(coef_w * -score_w + coef_l * -score_l)/d logits; the kernel's gradients are -gamma.
        grad_logits = torch.where(torch.isinf(nll_w)[None, :, None], 0.0, coef_w[None, :, None] * g_w)
        del g_w
        grad_logits += torch.where(torch.isinf(nll_l)[None, :, None], 0.0, coef_l[None, :, None] * g_l)
        del g_l
        frames = torch.arange(T, device=hidden.device)[:, None] < lengths
        grad_logits = torch.where((poison & frames)[..., None], float("nan"), grad_logits).transpose(0, 1)
        if grad_hidden is not None:
            grad_hidden[pairs] = torch.bmm(grad_logits, w_sub)
        if grad_weight is not None:
            grad_weight.index_add_(0, columns.flatten(), torch.bmm(grad_logits.transpose(1, 2), h).flatten(0, 1))
        if grad_bias is not None:
            grad_bias.index_add_(0, columns.flatten(), grad_logits.sum(1).flatten())
    return (scores_w, scores_l), (grad_hidden, grad_weight, grad_bias)


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
        chosen, rejected = sets
        acc = accumulation_dtype(hidden.dtype)
        ref_w, ref_l = ref_chosen.to(acc), ref_rejected.to(acc)
        per_unit_w = 1.0 / chosen.lengths.clamp(min=1).to(acc)
        per_unit_l = 1.0 / rejected.lengths.clamp(min=1).to(acc)
        B = hidden.shape[0]

        def terms(pairs, ll_w, ll_l):
            """Per pair: loss, margin z, d loss / d ll_w and d ll_l, infeasibility."""
            pw = ll_w * per_unit_w[pairs] if length_normalize else ll_w
            pl = ll_l * per_unit_l[pairs] if length_normalize else ll_l
            z = beta * ((pw - ref_w[pairs]) - (pl - ref_l[pairs]))  # sparse: the normalisers cancel
            infeasible = (ll_w == float("-inf")) | (ll_l == float("-inf"))
            per_pair = -F.logsigmoid(z)
            dz = -torch.sigmoid(-z) / B
            d_w = dz * beta * (per_unit_w[pairs] if length_normalize else 1.0)
            d_l = -dz * beta * (per_unit_l[pairs] if length_normalize else 1.0)
            if sft_weight:
                per_pair = per_pair - sft_weight * ll_w * per_unit_w[pairs]
                d_w = d_w - sft_weight * per_unit_w[pairs] / B
            if zero_infinity:
                per_pair = per_pair.masked_fill(infeasible, 0.0)
            return per_pair, z, d_w.masked_fill(infeasible, 0.0), d_l.masked_fill(infeasible, 0.0), infeasible

        def coefficients(pairs, ll_w, ll_l):  # of -ll, as the scorers take them
            _, _, d_w, d_l, infeasible = terms(pairs, ll_w, ll_l)
            return -d_w, -d_l, infeasible & (not zero_infinity)

        if sparse:
            (ll_w, ll_l), grads = _sparse_forward(hidden, weight, bias, input_lengths, sets, blank, backend,
                                                  needs, coefficients)
        else:
            (ll_w, ll_l), grads = _dense_forward(hidden, weight, bias, input_lengths, sets, blank, chunk_frames,
                                                 backend, needs, coefficients)
        per_pair, z, _, _, _ = terms(torch.arange(B, device=hidden.device), ll_w, ll_l)
        loss = per_pair.mean()
        ctx.grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))

        pw = ll_w * per_unit_w if length_normalize else ll_w
        pl = ll_l * per_unit_l if length_normalize else ll_l
        if sparse and exact_rewards:
            norm = _frame_normaliser(hidden, weight, bias, input_lengths, chunk_frames, backend)
            pw, pl = pw - norm, pl - norm
        rewards_known = not sparse or exact_rewards
        margins = z.detach()
        outputs = [loss, margins, (margins > 0).to(acc).mean()]
        if rewards_known:
            outputs += [beta * (pw - ref_w), beta * (pl - ref_l), pw, pl]
        else:
            outputs += [torch.empty(0, dtype=acc, device=loss.device)] * 4
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):
        grads = tuple(None if g is None else (g if bool(grad_loss == 1) else g * grad_loss.to(g.dtype))
                      for g in ctx.grads)
        return grads + (None,) * 13


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
        check_bool(name, flag)
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
