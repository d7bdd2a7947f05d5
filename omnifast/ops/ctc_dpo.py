"""CTC-DPO: direct preference optimisation of a CTC speech head, chosen and rejected unit
sequences scored against one emission sequence in one policy forward.

loss = mean_b -log sigmoid(beta * ((logpi_w - logref_w) - (logpi_l - logref_l)))
       [+ sft_weight * mean_b CTC-NLL(chosen_b) / max(L_w, 1)]

logpi is the CTC log-likelihood of the units under the head's emissions, optionally divided by
the number of units (``length_normalize``, OpenOmni's recipe). The reference values are
computed once by a frozen head (``dpo_reference.py``: :func:`reference_logps`; training keeps
them by example id in ``training/references.py``).

Two ways to the same loss:
- dense: the fused linear-CTC passes (full-vocabulary log-softmax) for both sequences;
- sparse (no length normalisation, no SFT term): chosen and rejected share frames and input
  length, so the per-frame log-sum-exp cancels in logpi_w - logpi_l. Only the logits of the
  columns {blank} U chosen U rejected of each pair are needed: cost T x K x D instead of
  T x V x D, the gradient scattered into those rows of the weight. The individual rewards need
  the normaliser; they are reported only with ``exact_rewards=True`` (one extra no-grad
  full-vocabulary pass), while margins, accuracy and the loss are always exact.

Figures (measured on the CPU, estimated on a GPU): ``docs/perf.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._ctc_engine import Scorer, even_groups, label_columns, labels_part, make_target_set, same_width, working_set_bytes
from ._dispatch import choose_backend, linear_ctc_kernels
from ._precision import accumulation_dtype, autocast_off, cast_all, matmul_dtype, scale_gradients
from .checks import (
    check_bool,
    check_chunk_frames,
    check_int,
    check_linear_head,
    check_number,
    check_tensor,
    ctc_targets,
)
from .dpo import DPOOutput, pair_losses

SPARSE_GROUP_ELEMENTS = 1 << 22  # CPU: pairs per group so that their logits stay ~16 MiB
GPU_SPARSE_GROUP_BYTES = 160 << 20  # CUDA: the scratch of one group of pairs (see _sparse_group)


CTCDPOOutput = DPOOutput  # what ctc_dpo_loss returns: the loss and TRL-style metrics


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


def _sparse_group(B: int, T: int, K: int, S: int, D: int, device: torch.device, itemsize: int) -> int:
    """Pairs per group. CPU: ~16 MiB of logits. CUDA: what fits the group budget (160 MiB, at
    most 1/16 of the free memory) at the group's fullest moment, the recursion: per pair its
    columns of the weight (K x D) and, for both sets, the state emissions and the recursion's
    buffer (4 x T x S float32). The logits (T x K) are freed before it and their gradient is
    allocated after it. B16 T1200 L500 D896 in float32: 22.8 MB a pair, 7 a group, 3 groups."""
    if device.type != "cuda":
        return max(1, SPARSE_GROUP_ELEMENTS // max(1, T * K))
    per_pair = K * D * itemsize + 4 * T * S * 4
    return max(1, min(B, working_set_bytes(device, GPU_SPARSE_GROUP_BYTES) // per_pair))


def _sparse_forward(hidden, weight, bias, input_lengths, sets, blank, backend, needs, pair_terms):
    """The sparse path, a group of pairs at a time: each pair's logits only for its own columns
    {blank} U chosen U rejected, scored as unnormalised log-probabilities (the per-frame
    normaliser cancels in the margin), through the same recursion and gradient kernels as the
    fused linear-CTC (one launch of each per group: every pair of the group, chosen and rejected
    side by side).
    ``pair_terms(pairs, ll_w, ll_l)`` gives each pair's coefficients of -score and poison mask.
    Returns both scores (B,) and the gradients, in the dtypes of hidden, weight and bias."""
    acc = accumulation_dtype(hidden.dtype)
    B, T, D = hidden.shape
    kernels = linear_ctc_kernels(backend)
    want_grad = any(needs)
    grad_hidden = torch.zeros_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=acc) if needs[2] and bias is not None else None
    scores = [torch.empty(B, dtype=acc, device=hidden.device) for _ in sets]
    K = 1 + sum(s.targets.shape[1] for s in sets)
    S = max(s.ext.shape[1] for s in sets)
    group = even_groups(B, _sparse_group(B, T, K, S, D, hidden.device, hidden.element_size()))
    for start in range(0, B, group):
        stop = min(B, start + group)
        pairs = torch.arange(start, stop, device=hidden.device)
        columns, local_targets = label_columns(blank, sets, pairs)
        G = columns.shape[0]
        w_sub = weight[columns]  # (G, K, D)
        h = hidden[start:stop]  # (G, T, D), a view
        if bias is None:  # (G, T, K), blank in column 0
            logits = torch.bmm(h, w_sub.transpose(1, 2))
        else:  # the bias joins inside the GEMM, as in F.linear: half-precision logits are rounded once
            logits = torch.baddbmm(bias[columns][:, None, :], h, w_sub.transpose(1, 2))
        logits = logits.to(acc)
        lengths = input_lengths[pairs]
        # Chosen and rejected as one batch of 2G sequences (targets padded to one width): one
        # recursion over both sets, so a group costs T dependent steps, not 2T.
        local = same_width([make_target_set(t, s.lengths[pairs], 0) for t, s in zip(local_targets, sets)], 0)
        S_local = local[0].ext.shape[1]
        index = torch.stack([s.ext for s in local])[:, :, None, :].expand(2, G, T, S_local)
        states = logits.expand(2, G, T, K).gather(3, index)  # (2, G, T, S)
        del logits  # the gradient needs no logit values (no softmax term): it starts from zeros
        ll = kernels.ctc_states(
            states.view(2 * G, T, S_local),
            torch.cat([s.targets for s in local]),
            lengths.repeat(2),
            torch.cat([s.lengths for s in local]),
            0,
            want_grad,
        )
        lls = ll.split(G)
        for score, set_ll, target_set, set_states in zip(scores, lls, local, states):
            score[pairs] = set_ll
            target_set.states = set_states
        if not want_grad:
            continue
        coef_w, coef_l, poison = pair_terms(pairs, *lls)
        # d(coef_w * -score_w + coef_l * -score_l) / d logits: the scores are unnormalised, so
        # the labels' part is the whole gradient
        grad_logits = torch.zeros(G, T, K, dtype=acc, device=hidden.device)
        labels_part(kernels, grad_logits, lengths, local, [s.states for s in local], [coef_w, coef_l], poison)
        del states, local  # the occupancies: freed before the GEMMs' outputs arrive
        grad_logits = grad_logits.to(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[start:stop] = torch.bmm(grad_logits, w_sub)
        if grad_weight is not None:
            update = torch.bmm(grad_logits.transpose(1, 2), h).flatten(0, 1)
            grad_weight.index_add_(0, columns.flatten(), update.to(acc))
        if grad_bias is not None:
            grad_bias.index_add_(0, columns.flatten(), grad_logits.sum(1, dtype=acc).flatten())
    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    return tuple(scores), grads


def _frame_normaliser(hidden, weight, bias, input_lengths, chunk_frames, backend):
    """sum_t logsumexp of the full-vocabulary logits over each sequence's frames (no grad)."""
    with torch.no_grad():
        empty = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
        lengths = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        scorer = Scorer(
            hidden, weight, bias, input_lengths, [make_target_set(empty, lengths, 0)], 0, chunk_frames, backend
        )
        scorer.log_likelihoods(want_occupancy=False)
        return scorer.lse.sum(1)


def _infeasible(ll_w: torch.Tensor, ll_l: torch.Tensor) -> torch.Tensor:
    """Pairs with a side of log-likelihood -inf (too few frames, or -inf inputs)."""
    return (ll_w == float("-inf")) | (ll_l == float("-inf"))


class _CTCDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        sets,
        input_lengths,
        ref_chosen,
        ref_rejected,
        beta,
        length_normalize,
        sft_weight,
        zero_infinity,
        sparse,
        exact_rewards,
        blank,
        chunk_frames,
        backend,
    ):
        needs = tuple(ctx.needs_input_grad[:3])
        chosen, rejected = sets
        acc = accumulation_dtype(hidden.dtype)
        ref_w, ref_l = ref_chosen.to(acc), ref_rejected.to(acc)
        per_unit_w = 1.0 / chosen.lengths.clamp(min=1).to(acc)
        per_unit_l = 1.0 / rejected.lengths.clamp(min=1).to(acc)
        B = hidden.shape[0]

        def terms(pairs, ll_w, ll_l):
            """Per pair of ``pairs``: the loss (DPO + SFT) and the margin, from the log-likelihoods."""
            pw = ll_w * per_unit_w[pairs] if length_normalize else ll_w
            pl = ll_l * per_unit_l[pairs] if length_normalize else ll_l
            per_pair, chosen_rewards, rejected_rewards = pair_losses(pw, pl, ref_w[pairs], ref_l[pairs], beta)
            z = chosen_rewards - rejected_rewards  # sparse: the normalisers cancel
            if sft_weight:
                per_pair = per_pair - sft_weight * ll_w * per_unit_w[pairs]
            return per_pair, z

        def coefficients(pairs, ll_w, ll_l):
            """d loss / d (-ll) of each side, as the scorers take them (by autograd on the pairs'
            log-likelihoods), 0 for infeasible pairs; and which pairs poison the gradient."""
            infeasible = _infeasible(ll_w, ll_l)
            with torch.enable_grad():
                leaves = ll_w.detach().requires_grad_(), ll_l.detach().requires_grad_()
                d_w, d_l = torch.autograd.grad(terms(pairs, *leaves)[0].sum() / B, leaves)
            return (
                -d_w.masked_fill(infeasible, 0.0),
                -d_l.masked_fill(infeasible, 0.0),
                infeasible & (not zero_infinity),
            )

        if sparse:
            (ll_w, ll_l), grads = _sparse_forward(
                hidden, weight, bias, input_lengths, sets, blank, backend, needs, coefficients
            )
        else:
            (ll_w, ll_l), grads = _dense_forward(
                hidden, weight, bias, input_lengths, sets, blank, chunk_frames, backend, needs, coefficients
            )
        per_pair, z = terms(torch.arange(B, device=hidden.device), ll_w, ll_l)
        if zero_infinity:
            per_pair = per_pair.masked_fill(_infeasible(ll_w, ll_l), 0.0)
        loss = per_pair.mean()
        ctx.grads = grads

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
        return scale_gradients(ctx.grads, grad_loss) + (None,) * 13


def ctc_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    input_lengths,
    chosen_lengths,
    rejected_lengths,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    length_normalize: bool = False,
    sft_weight: float = 0.0,
    blank: Optional[int] = None,
    zero_infinity: bool = False,
    sparse: Optional[bool] = None,
    exact_rewards: bool = False,
    chunk_frames: Optional[int] = None,
    backend: Optional[str] = None,
) -> CTCDPOOutput:
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
    check_number("beta", beta, positive=True)
    check_number("sft_weight", sft_weight, low=0.0)
    for name, flag in (
        ("length_normalize", length_normalize),
        ("zero_infinity", zero_infinity),
        ("exact_rewards", exact_rewards),
    ):
        check_bool(name, flag)
    check_chunk_frames(chunk_frames)
    sets = []
    input_lengths_checked = None
    for prefix, targets, lengths in (("chosen", chosen, chosen_lengths), ("rejected", rejected, rejected_lengths)):
        if isinstance(targets, torch.Tensor) and targets.dim() == 2 and targets.shape[0] != B:
            raise ValueError(f"{prefix} has batch size {targets.shape[0]} but hidden has {B}")
        padded, input_lengths_checked, lengths = ctc_targets(
            targets,
            input_lengths,
            lengths,
            blank,
            T=T,
            B=B,
            C=V,
            device=hidden.device,
            name="hidden",
            targets_name=prefix,
            lengths_name=f"{prefix}_lengths",
        )
        sets.append(make_target_set(padded, lengths, blank))
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_tensor(name, ref, floating=True)
        if ref.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},), one value per pair, got {tuple(ref.shape)}")
    refs = torch.stack(
        [ref_chosen_logps.to(hidden.device, torch.float64), ref_rejected_logps.to(hidden.device, torch.float64)]
    )
    finite = torch.isfinite(refs).all(1).tolist()  # one read-back for both
    for name, ref, ok in (
        ("ref_chosen_logps", ref_chosen_logps, finite[0]),
        ("ref_rejected_logps", ref_rejected_logps, finite[1]),
    ):
        if not ok:
            raise ValueError(f"{name} must be finite, got {ref.tolist()}")
    dense_only = length_normalize or sft_weight > 0
    if sparse is None:
        sparse = not dense_only
    elif sparse and dense_only:
        raise ValueError(
            "sparse=True needs length_normalize=False and sft_weight=0: "
            "the per-frame normaliser only cancels without them"
        )
    chosen_backend = choose_backend(hidden.device, backend)
    device = hidden.device.type
    hidden, weight, bias = cast_all(matmul_dtype(device, hidden, weight, bias), (hidden, weight, bias))
    with autocast_off(device):
        out = _CTCDPOFunction.apply(
            hidden,
            weight,
            bias,
            sets,
            input_lengths_checked,
            ref_chosen_logps.to(hidden.device),
            ref_rejected_logps.to(hidden.device),
            float(beta),
            length_normalize,
            float(sft_weight),
            zero_infinity,
            sparse,
            exact_rewards,
            blank,
            chunk_frames,
            chosen_backend,
        )
    loss, margins, accuracy, cr, rr, pw, pl = out
    known = cr.numel() > 0 or B == 0
    return CTCDPOOutput(
        loss,
        margins,
        accuracy,
        cr if known else None,
        rr if known else None,
        pw if known else None,
        pl if known else None,
    )
