"""Readable pure-torch versions of every op: the specification all kernels are tested against.

CTC works on the extended label sequence l' = (blank, y1, blank, y2, ..., yL, blank) of
S = 2L + 1 states. alpha[t, s] is the log-probability of all paths through frames 0..t that
end in state s, beta[t, s] of all paths from state s at frame t to the end (both include
frame t's emission). The recursions are vectorised over batch and states; time is a loop.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._precision import accumulation_dtype

NEG_INF = float("-inf")


def extended_labels(targets: torch.Tensor, target_lengths: torch.Tensor, blank: int):
    """Return ``ext`` (B, S) state labels, ``valid`` (B, S) states inside 2L+1 and ``skip``
    (B, S): whether state s may be entered from s-2 (a label differing from the one before)."""
    B, width = targets.shape
    S = 2 * width + 1
    ext = torch.full((B, S), blank, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = targets
    valid = torch.arange(S, device=targets.device) < (2 * target_lengths + 1)[:, None]
    ext = torch.where(valid, ext, blank)
    skip = torch.zeros_like(valid)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    return ext, valid, skip


def _shift_right(x: torch.Tensor, by: int) -> torch.Tensor:
    return F.pad(x, (by, 0), value=NEG_INF)[..., : x.shape[-1]]


def _shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    return F.pad(x, (0, by), value=NEG_INF)[..., by:]


def ctc_alpha_beta(log_probs, targets, input_lengths, target_lengths, blank):
    """Forward and backward variables in log space, each (T, B, S), -inf outside the valid
    frames and states, plus the emissions ``lpe`` (T, B, S), ``ext`` and per-sequence log p(y|x)."""
    T, B, _ = log_probs.shape
    ext, valid, skip = extended_labels(targets, target_lengths, blank)
    lpe = log_probs.gather(2, ext.expand(T, B, ext.shape[1])).masked_fill(~valid, NEG_INF)
    alpha, beta, ll = forward_backward(lpe, skip, input_lengths, target_lengths)
    return alpha, beta, lpe, ext, ll


def forward_backward(lpe, skip, input_lengths, target_lengths):
    """alpha, beta (T, B, S) and log p(y|x) (B,) from the state emissions ``lpe`` (T, B, S)
    (-inf on states past 2L+1) and the jump mask ``skip`` of :func:`extended_labels`."""
    T, B, S = lpe.shape
    device = lpe.device
    frames = torch.arange(T, device=device)[:, None]
    last = input_lengths - 1

    alpha = torch.full_like(lpe, NEG_INF)
    alpha[0, :, :2] = lpe[0, :, :2]
    for t in range(1, T):
        prev = alpha[t - 1]
        stay, step = prev, _shift_right(prev, 1)
        jump = _shift_right(prev, 2).masked_fill(~skip, NEG_INF)
        alpha[t] = torch.logsumexp(torch.stack([stay, step, jump]), 0) + lpe[t]
    alpha = alpha.masked_fill((frames >= input_lengths)[..., None], NEG_INF)

    end = (2 * target_lengths)[:, None]
    states = torch.arange(S, device=device)
    is_end = (states == end) | (states == end - 1)
    beta = torch.full_like(lpe, NEG_INF)
    skip_from = _shift_left(skip.to(lpe.dtype), 2) > 0  # may jump from s to s+2
    nxt = torch.full_like(lpe[0], NEG_INF)
    for t in range(T - 1, -1, -1):
        jump = _shift_left(nxt, 2).masked_fill(~skip_from, NEG_INF)
        inner = torch.logsumexp(torch.stack([nxt, _shift_left(nxt, 1), jump]), 0) + lpe[t]
        start = lpe[t].masked_fill(~is_end, NEG_INF)
        here = torch.where((t == last)[:, None], start, torch.where((t < last)[:, None], inner, NEG_INF))
        beta[t] = here
        nxt = here

    at_end = alpha[last.clamp(min=0), torch.arange(B, device=device)]  # (B, S)
    ll = torch.logsumexp(at_end.masked_fill(~is_end, NEG_INF), 1)
    empty = input_lengths == 0
    ll = torch.where(empty, torch.where(target_lengths == 0, 0.0, NEG_INF).to(ll.dtype), ll)
    return alpha, beta, ll


def occupancy(alpha, beta, lpe, ll):
    """Posterior probability of each state at each frame, 0 where no path passes."""
    path = alpha + beta
    return torch.where(path == NEG_INF, 0.0, torch.exp(path - lpe - ll[None, :, None]))


def ctc_nll_and_grad(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    zero_infinity: bool,
    grad_scale: Optional[torch.Tensor],
    from_logits: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sequence negative log-likelihood (B,) and, when ``grad_scale`` (B,) is given, its
    exact gradient w.r.t. the inputs times ``grad_scale``: -gamma for log-probs, or
    softmax - gamma for logits (``from_logits``: a log_softmax is applied first).

    Infeasible sequences have nll = inf and a NaN gradient, or 0 and 0 with ``zero_infinity``.
    """
    acc = accumulation_dtype(log_probs.dtype)
    x = log_probs.to(acc)
    lp = torch.log_softmax(x, -1) if from_logits else x
    alpha, beta, lpe, ext, ll = ctc_alpha_beta(lp, targets, input_lengths, target_lengths, blank)
    frames = torch.arange(lp.shape[0], device=lp.device)[:, None] < input_lengths
    # a log-probability of +inf is no probability: the sequence's loss and gradient are NaN, as
    # the kernels' log-sum-exp (inf - inf) makes them
    poisoned = ((lp == float("inf")) & frames[..., None]).any(-1).any(0)
    nll = torch.where(poisoned, float("nan"), -ll)
    infeasible = torch.isinf(nll)
    if zero_infinity:
        nll = nll.masked_fill(infeasible, 0.0)
    if grad_scale is None:
        return nll, None

    gamma = occupancy(alpha, beta, lpe, ll)
    grad = torch.zeros_like(lp).scatter_add_(2, ext.expand_as(gamma), -gamma)
    if from_logits:  # chain rule through log_softmax
        grad = grad - torch.exp(lp) * grad.sum(-1, keepdim=True)
    grad = torch.where(infeasible[None, :, None], 0.0 if zero_infinity else float("nan"), grad)
    grad = torch.where(poisoned[None, :, None], float("nan"), grad)
    grad = torch.where(frames[..., None], grad, 0.0) * grad_scale.to(acc)[None, :, None]
    return nll, grad.to(log_probs.dtype)


# --- fused linear-CTC building blocks (the C++ and Triton backends implement the same three) ---
# A chunk is the logits (B, t, V) of frames [t0, t0 + t) in the accumulation dtype. Emissions
# and occupancies are (B, T, S) per target set, with ``ext`` (B, S) the extended labels.


def chunk_emissions(logits, t0, input_lengths, exts, target_lengths, emissions):
    """Return the log_softmax normaliser (B, t) of each chunk row (0 past an input length) and
    write each target set's normalised state emissions into ``emissions[k][:, t0:t0 + t]``."""
    B, ct, _ = logits.shape
    live = (t0 + torch.arange(ct, device=logits.device))[None, :] < input_lengths[:, None]
    lse = torch.where(live, torch.logsumexp(logits, -1), 0.0)
    for ext, out in zip(exts, emissions):
        out[:, t0 : t0 + ct] = logits.gather(2, ext[:, None, :].expand(B, ct, ext.shape[1])) - lse[..., None]
    return lse


def ctc_states(emissions, targets, input_lengths, target_lengths, blank, want_occupancy):
    """log p(y|x) (B,) from normalised state emissions (B, T, S); with ``want_occupancy`` the
    state occupancies overwrite ``emissions`` (0 for infeasible sequences)."""
    _, valid, skip = extended_labels(targets, target_lengths, blank)
    lpe = emissions.transpose(0, 1).masked_fill(~valid, NEG_INF)
    frames = torch.arange(lpe.shape[0], device=lpe.device)[:, None] < input_lengths
    lpe = lpe.masked_fill(~frames[..., None], NEG_INF)
    alpha, beta, ll = forward_backward(lpe, skip, input_lengths, target_lengths)
    if want_occupancy:
        gamma = torch.where((ll == NEG_INF)[None, :, None], 0.0, occupancy(alpha, beta, lpe, ll))
        emissions.copy_(gamma.transpose(0, 1))
    return ll


def chunk_grad(logits, lse, t0, input_lengths, softmax_coef, exts, target_lengths, occupancies, coefs, poison):
    """Overwrite a logits chunk with its gradient: softmax * softmax_coef[b] minus, for each
    target set k, coefs[k][b] * occupancy scattered onto the state labels; rows past an input
    length become 0 and rows of ``poison`` sequences NaN."""
    B, ct, _ = logits.shape
    grad = torch.softmax(logits, -1) * softmax_coef[:, None, None]
    for ext, lengths, gamma, coef in zip(exts, target_lengths, occupancies, coefs):
        states = torch.arange(ext.shape[1], device=logits.device)
        valid = (states[None, :] < 2 * lengths[:, None] + 1)[:, None, :]
        weighted = torch.where(valid, gamma[:, t0 : t0 + ct], 0.0) * coef[:, None, None]
        grad.scatter_add_(2, ext[:, None, :].expand(B, ct, ext.shape[1]), -weighted)
    live = (t0 + torch.arange(ct, device=logits.device))[None, :] < input_lengths[:, None]
    grad = torch.where(poison[:, None, None], float("nan"), grad)
    logits.copy_(torch.where(live[..., None], grad, 0.0))


# --- MoE routing and combine ---


def moe_route(logits: torch.Tensor, top_k: int, normalize: bool):
    """Top-k routing from float32 logits (N, E), autograd through probs, weights and lse:
    (probs, weights, experts, lse, counts, offsets, order, position). The contract of the
    MoE kernels' ``route``."""
    E = logits.shape[1]
    probs = torch.softmax(logits, -1)
    experts = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    order = torch.sort(flat, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=logits.device)
    return probs, weights, experts, torch.logsumexp(logits, -1), counts, offsets, order, position


def moe_unpermute(y: torch.Tensor, position: torch.Tensor, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * y[position[n * top_k + j]] (weights 1 when None), by gather."""
    gathered = y[position].view(position.numel() // top_k, top_k, y.shape[-1])
    if weights is None:
        return gathered.sum(1)
    return torch.einsum("nk,nko->no", weights.to(gathered.dtype), gathered)


# --- finite scalar quantisation ---


def fsq_forward(z: torch.Tensor, half_level, offset, shift, half_width, basis):
    """Rows z (N, D) -> codes (N, D) = round(tanh(z + shift) * half_level - offset) / half_width
    (round half to even) and indices (N,) = sum_d (q_d + half_width_d) * basis_d, -1 for a row
    holding NaN (whose codes are NaN there)."""
    bounded = torch.tanh(z.float() + shift) * half_level - offset
    q = torch.round(bounded)
    nan = torch.isnan(q)
    indices = ((torch.where(nan, 0.0, q) + half_width).long() * basis).sum(-1)
    return (q / half_width).to(z.dtype), torch.where(nan.any(-1), -1, indices)


def fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, half_level, shift, half_width) -> torch.Tensor:
    """The straight-through gradient: rounding passes the gradient of the bounded value."""
    t = torch.tanh(z.float() + shift)
    return (grad_codes.float() * half_level * (1 - t * t) / half_width).to(z.dtype)
