"""Fused linear + CTC: the loss of ``ctc_loss(log_softmax(hidden @ weight.T + bias))`` without
ever holding the (B, T, V) logits.

Pass 1 computes each chunk's logits, their log-sum-exp and the emissions of the 2L+1 label
states; the alpha/beta recursion then runs on (B, T, 2L+1) only and leaves the state
occupancies gamma in place of the emissions. The gradient of a row of logits is
coef * (softmax - gamma summed at the row's labels), and the coefficients of the mean and sum
reductions are known before the recursion, so for them pass 1 also turns each chunk into
coef * softmax and runs its two gradient GEMMs; the labels' part waits for gamma and costs a
(T, 1 + W) block per sequence against its own rows of the weight (``Scorer.one_pass``). That is
the three full-size GEMMs of the unfused recipe and no more, as Liger's fused linear
cross-entropy does for its loss; only ``reduction="none"`` (the weights arrive with the
backward) and CTC-DPO's dense path (the weights depend on both sets' log p) run a pass 2 that
recomputes each chunk's logits and turns them into the whole gradient (``Scorer.gradients``).
Extra memory: one chunk of logits plus B x T x (2L+1).

Estimate, B16 T1200 D896 V6562 L500 on an H100, from the issue's own measurements: torch's
fp32 recipe took 22.1 ms, of which its CTC and softmax ~6.65 ms, so its three GEMMs (677 GFLOP)
ran at ~44 TFLOP/s. Here: the same three GEMMs (~15.4 ms), the labels' blocks (501 of 6562
columns: ~35 GFLOP as batched GEMMs, ~0.8 ms), passes over the logits chunks (emissions read,
softmax read + write: ~1.5 GB, ~0.5 ms) and the recursion (1200 dependent steps at ~1.0 us,
1.55 us at the first kernel's measured rate: 1.2-1.9 ms): ~18-18.6 ms, ~1.2x torch in fp32 (two
passes with the recomputed GEMM: ~22.5 ms, ~1.0x). In bf16 (torch: 11.7 ms, its GEMMs ~4.5 ms of it,
~150 TFLOP/s) the recursion becomes the larger part: ~6.5 ms, ~1.8x, at that GEMM rate; ~3.8 ms,
~3x, if the GEMMs reach 400 TFLOP/s.
Unmeasured: no GPU was lent to this session.

The same machinery scores several target sets against one emission sequence (CTC-DPO's chosen
and rejected units): their emissions come from the same chunk of logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import REDUCTIONS, check_bool, check_choice, check_int, check_tensor, ctc_targets
from ._dispatch import choose_backend, linear_ctc_kernels
from ._precision import accumulation_dtype, autocast_off, cast_all, matmul_dtype, scale_gradients
from ._reference import extended_labels
from .ctc import reduction_weights

CHUNK_ELEMENTS = 1 << 22          # CPU: logits per chunk, 16 MiB in float32 (measured fastest there)
GPU_CHUNK_BYTES = 64 << 20        # CUDA: at most this much of logits per chunk ...
GPU_CHUNK_ROWS_PER_SM = 32        # ... aiming at 32 rows per multiprocessor, so a chunk's GEMMs fill the GPU


@dataclass
class TargetSet:
    """One set of targets scored against the shared frames: padded (B, W) int64 targets,
    (B,) lengths, extended labels (B, S) and, after pass 1, emissions/occupancies (B, T, S)."""
    targets: torch.Tensor
    lengths: torch.Tensor
    ext: torch.Tensor
    states: Optional[torch.Tensor] = None


def make_target_set(targets, lengths, blank) -> TargetSet:
    ext, _, _ = extended_labels(targets, lengths, blank)
    return TargetSet(targets, lengths, ext.contiguous())


def working_set_bytes(device: torch.device, cap: int) -> int:
    """How much scratch one pass may hold: ``cap``, and on a GPU at most 1/16 of its free memory."""
    if device.type != "cuda":
        return cap
    free, _ = torch.cuda.mem_get_info(device)
    return max(1 << 20, min(cap, free // 16))


def default_chunk_frames(batch: int, hidden: int, vocab: int, device: Optional[torch.device] = None,
                         itemsize: int = 4) -> int:
    """Frames per chunk. CPU: ~16 MiB of logits and hidden rows, which stays in cache. CUDA:
    rows enough for 32 per multiprocessor (a chunk's three GEMMs then run at full size), capped
    at 64 MiB of logits and 1/16 of the free memory. B16 x V6562 on an H100 (132 SMs): 264 frames
    per chunk in bf16, 159 in float32 (by the memory cap)."""
    batch = max(batch, 1)
    if device is None or device.type != "cuda":
        return max(1, CHUNK_ELEMENTS // (batch * (vocab + hidden)))
    rows = GPU_CHUNK_ROWS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    rows = min(rows, working_set_bytes(device, GPU_CHUNK_BYTES) // (vocab * itemsize))
    return max(1, rows // batch)


def same_width(sets: Sequence[TargetSet], blank: int) -> List[TargetSet]:
    """The target sets with their targets padded (by ``blank``, past every length) to the widest,
    so that their states stack into one (K, B, T, S) tensor."""
    width = max(s.targets.shape[1] for s in sets)
    return [s if s.targets.shape[1] == width else
            make_target_set(F.pad(s.targets, (0, width - s.targets.shape[1]), value=blank), s.lengths, blank)
            for s in sets]


def label_columns(blank, sets, rows):
    """For the given rows (sequences), the columns {blank} U the labels of every set (blank
    first, then the labels in increasing order, padded with blank to the widest possible count so
    that nothing is read back to the host), and each set's targets as positions among them.
    Returns (G, K) columns and one (G, W) local-target tensor per set."""
    never = torch.iinfo(torch.long).max  # sorts after every label: padding
    keys = [torch.full((rows.numel(), 1), -1, dtype=torch.long, device=rows.device)]  # -1: the blank
    for s in sets:
        width = s.targets.shape[1]
        valid = torch.arange(width, device=rows.device) < s.lengths[rows][:, None]
        keys.append(torch.where(valid, s.targets[rows], never))
    keys, _ = torch.sort(torch.cat(keys, 1), dim=1)
    K = keys.shape[1]
    first = torch.ones_like(keys, dtype=torch.bool)
    first[:, 1:] = keys[:, 1:] != keys[:, :-1]
    slot = torch.where(first, torch.cumsum(first, 1) - 1, K)  # repeats go to a discarded column K
    distinct = torch.full((keys.shape[0], K + 1), never, dtype=torch.long, device=keys.device)
    distinct.scatter_(1, slot, keys)
    distinct = distinct[:, :K].contiguous()
    columns = torch.where((distinct == -1) | (distinct == never), blank, distinct)
    local = [torch.searchsorted(distinct, s.targets[rows].contiguous()).clamp(max=K - 1) for s in sets]
    return columns, local


def feasible_by_length(target_set: TargetSet, input_lengths: torch.Tensor) -> torch.Tensor:
    """Whether each sequence has frames enough for its targets: L, plus a blank between each two
    equal neighbours. For finite inputs this is exactly where log p(y|x) > -inf."""
    targets, lengths = target_set.targets, target_set.lengths
    if targets.shape[1] < 2:
        return input_lengths >= lengths
    inside = torch.arange(1, targets.shape[1], device=targets.device) < lengths[:, None]
    repeats = ((targets[:, 1:] == targets[:, :-1]) & inside).sum(1)
    return input_lengths >= lengths + repeats


class Scorer:
    """Runs the two passes for a linear head over hidden (B, T, D) and some target sets.

    ``hidden``, ``weight`` and ``bias`` arrive in the matmul dtype (``_precision.matmul_dtype``);
    the logits come out of the GEMM in that dtype, the Triton kernels read them as they are and
    the CPU kernels take a float32 copy of each chunk; everything after the GEMM accumulates in
    float32 (float64 for float64)."""

    def __init__(self, hidden, weight, bias, input_lengths, sets: Sequence[TargetSet], blank: int,
                 chunk_frames: Optional[int], backend: str):
        self.acc = accumulation_dtype(hidden.dtype)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.input_lengths, self.blank = input_lengths, blank
        self.sets = same_width(sets, blank)
        B, T, D = hidden.shape
        self.chunk = chunk_frames or default_chunk_frames(B, D, weight.shape[0], hidden.device, hidden.element_size())
        self.kernels = linear_ctc_kernels(backend)
        self.logits_in_acc = backend != "triton"
        self.lse = torch.zeros(B, T, dtype=self.acc, device=hidden.device)

    def _chunks(self):
        T = self.hidden.shape[1]
        for t0 in range(0, T, self.chunk):
            rows = self.hidden[:, t0:t0 + self.chunk]
            logits = F.linear(rows, self.weight, self.bias)
            yield t0, rows, logits.to(self.acc) if self.logits_in_acc else logits

    def log_likelihoods(self, want_occupancy: bool) -> List[torch.Tensor]:
        """Pass 1 and the recursion: log p(y|x) (B,) for each target set."""
        B, T, _ = self.hidden.shape
        states = torch.zeros(len(self.sets), B, T, self.sets[0].ext.shape[1], dtype=self.acc, device=self.hidden.device)
        for target_set, set_states in zip(self.sets, states):
            target_set.states = set_states
        exts = [s.ext for s in self.sets]
        lengths = [s.lengths for s in self.sets]
        for t0, _, logits in self._chunks():
            lse = self.kernels.chunk_emissions(logits, t0, self.input_lengths, exts, lengths,
                                               [s.states for s in self.sets])
            self.lse[:, t0:t0 + logits.shape[1]] = lse
            del logits  # the last chunk is not kept alive through the recursion
        # Every target set in one recursion (K * B sequences): T dependent steps, not K * T.
        ll = self.kernels.ctc_states(states.view(-1, T, states.shape[-1]), torch.cat([s.targets for s in self.sets]),
                                     self.input_lengths.repeat(len(self.sets)),
                                     torch.cat([s.lengths for s in self.sets]), self.blank, want_occupancy)
        return list(ll.split(B))

    def _accumulate(self, grad_logits, rows, t0, grad_hidden, grad_weight, grad_bias) -> None:
        """Add one chunk's logits gradient (B, ct, V), in the matmul dtype, into the gradients
        of hidden (its frames written), weight and bias (float32 accumulators)."""
        ct = grad_logits.shape[1]
        flat = grad_logits.reshape(-1, grad_logits.shape[-1])
        if grad_hidden is not None:
            grad_hidden[:, t0:t0 + ct] = grad_logits @ self.weight
        if grad_weight is not None:
            rows_flat = rows.reshape(-1, rows.shape[-1])
            if grad_logits.dtype == self.acc:
                grad_weight.addmm_(flat.t(), rows_flat)
            else:  # a half-precision GEMM per chunk, summed over the chunks in float32
                grad_weight += (flat.t() @ rows_flat).to(self.acc)
        if grad_bias is not None:
            grad_bias += flat.sum(0, dtype=self.acc)

    def gradients(self, coefs: Sequence[torch.Tensor], poison: torch.Tensor, needs=(True, True, True)):
        """Pass 2: gradients of sum_k sum_b coefs[k][b] * (-log p_k(y_b|x_b)) w.r.t. hidden,
        weight and bias (None where not needed), in their own dtypes; sequences in ``poison``
        get NaN. The weight and bias gradients accumulate over the chunks in float32."""
        coefs = [c.to(self.acc).contiguous() for c in coefs]
        softmax_coef = torch.stack(coefs).sum(0).contiguous()
        grad_hidden = torch.empty_like(self.hidden) if needs[0] else None
        grad_weight = torch.zeros_like(self.weight, dtype=self.acc) if needs[1] else None
        grad_bias = torch.zeros_like(self.bias, dtype=self.acc) if needs[2] and self.bias is not None else None
        exts = [s.ext for s in self.sets]
        lengths = [s.lengths for s in self.sets]
        states = [s.states for s in self.sets]
        for t0, rows, logits in self._chunks():
            ct = logits.shape[1]
            self.kernels.chunk_grad(logits, self.lse[:, t0:t0 + ct].contiguous(), t0, self.input_lengths,
                                    softmax_coef, exts, lengths, states, coefs, poison)
            self._accumulate(logits.to(self.hidden.dtype), rows, t0, grad_hidden, grad_weight, grad_bias)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(self.weight.dtype),
                None if grad_bias is None else grad_bias.to(self.bias.dtype))

    def one_pass(self, coef: torch.Tensor, needs=(True, True, True)):
        """Pass 1 with the gradient formed on the way, for one target set whose coefficients of
        -log p are known before the recursion (the mean and sum reductions).

        A row's logits gradient is coef * softmax minus coef * (summed occupancy) at the row's
        labels. Each chunk's logits give their emissions and then become coef * softmax, whose
        two GEMMs are the dense part of every gradient; after the recursion what is left is the
        labels' part, a (T, 1 + W) block per sequence multiplied against its own rows of the
        weight (as sparse CTC-DPO does), (1 + W) / V of a full GEMM. Three full-size GEMMs, as
        the unfused recipe runs, where pass 1 + pass 2 run four. Returns log p (B,) and the
        gradients (hidden, weight, bias) in the accumulation dtype, None where not needed;
        infeasible sequences are not poisoned here."""
        (target_set,) = self.sets
        B, T, D = self.hidden.shape
        device, acc, mm = self.hidden.device, self.acc, self.hidden.dtype
        coef = coef.to(acc).contiguous()
        grad_hidden = torch.empty(B, T, D, dtype=acc, device=device) if needs[0] else None
        grad_weight = torch.zeros_like(self.weight, dtype=acc) if needs[1] else None
        grad_bias = torch.zeros_like(self.bias, dtype=acc) if needs[2] and self.bias is not None else None
        states = torch.zeros(B, T, target_set.ext.shape[1], dtype=acc, device=device)
        target_set.states = states
        no_labels = make_target_set(target_set.targets[:, :0], torch.zeros_like(target_set.lengths), self.blank)
        no_occupancy = torch.zeros(B, T, 1, dtype=acc, device=device)
        zero = torch.zeros(B, dtype=acc, device=device)
        no_poison = torch.zeros(B, dtype=torch.bool, device=device)
        for t0, rows, logits in self._chunks():
            ct = logits.shape[1]
            self.lse[:, t0:t0 + ct] = self.kernels.chunk_emissions(logits, t0, self.input_lengths, [target_set.ext],
                                                                   [target_set.lengths], [states])
            # coef * softmax over the chunk (a blank-only target set with zero weight leaves
            # nothing else), rows past an input length 0
            self.kernels.chunk_grad(logits, self.lse[:, t0:t0 + ct].contiguous(), t0, self.input_lengths, coef,
                                    [no_labels.ext], [no_labels.lengths], [no_occupancy], [zero], no_poison)
            self._accumulate(logits.to(mm), rows, t0, grad_hidden, grad_weight, grad_bias)
            del logits
        ll = self.kernels.ctc_states(states, target_set.targets, self.input_lengths, target_set.lengths, self.blank,
                                     True)
        K = 1 + target_set.targets.shape[1]
        group = _label_group(B, T, K, D, device, self.hidden.element_size())
        unnormalised = torch.full((group, T), float("inf"), dtype=acc, device=device)  # exp(0 - inf) = 0
        for start in range(0, B, group):
            stop = min(B, start + group)
            columns, (local_targets,) = label_columns(self.blank, [target_set], torch.arange(start, stop, device=device))
            local = make_target_set(local_targets, target_set.lengths[start:stop], 0)
            G = stop - start
            block = torch.zeros(G, T, K, dtype=acc, device=device)
            self.kernels.chunk_grad(block, unnormalised[:G], 0, self.input_lengths[start:stop], zero[:G], [local.ext],
                                    [local.lengths], [states[start:stop]], [coef[start:stop]], no_poison[:G])
            block = block.to(mm)
            if grad_hidden is not None:
                grad_hidden[start:stop] += torch.bmm(block, self.weight[columns])
            if grad_weight is not None:
                update = torch.bmm(block.transpose(1, 2), self.hidden[start:stop]).flatten(0, 1)
                grad_weight.index_add_(0, columns.flatten(), update.to(acc))
            if grad_bias is not None:
                grad_bias.index_add_(0, columns.flatten(), block.sum(1, dtype=acc).flatten())
        return ll, (grad_hidden, grad_weight, grad_bias)


def _label_group(B: int, T: int, K: int, D: int, device: torch.device, itemsize: int) -> int:
    """Sequences per block of the labels' gradient part, within a quarter of a logits chunk's
    budget (the blocks, their weight rows and their GEMM outputs live beside the whole gradient
    and the occupancies, at the op's fullest moment): ~4 MiB of (T, K) blocks on a CPU, 16 MiB of
    everything on a GPU. Evened out."""
    if device.type != "cuda":
        group = max(1, CHUNK_ELEMENTS // 4 // max(1, T * K))
    else:
        per_sequence = T * K * (4 + itemsize) + K * D * (4 + 2 * itemsize) + T * D * itemsize
        group = max(1, working_set_bytes(device, GPU_CHUNK_BYTES // 4) // per_sequence)
    return even_groups(B, group)


def even_groups(count: int, most: int) -> int:
    """The group size that cuts ``count`` items into as few groups of at most ``most`` as can
    be, evened out: 17 by at most 8 go 6, 6, 5, not 8, 8, 1 (no items: 1)."""
    groups = -(-count // most)
    return -(-count // groups) if groups else 1


def check_linear_head(hidden, weight, bias):
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D) batch-first, got shape {tuple(hidden.shape)}")
    if hidden.shape[1] == 0:
        raise ValueError("hidden needs at least one frame (T >= 1)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, D) with D = hidden width {hidden.shape[2]}, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},) like weight's rows, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def check_chunk_frames(chunk_frames):
    if chunk_frames is not None and check_int("chunk_frames", chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")


class _LinearCTCFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, input_lengths, target_lengths, blank, reduction,
                zero_infinity, chunk_frames, backend):
        target_set = make_target_set(targets, target_lengths, blank)
        scorer = Scorer(hidden, weight, bias, input_lengths, [target_set], blank, chunk_frames, backend)
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.zero_infinity, ctx.needs = reduction, zero_infinity, needs
        weights = reduction_weights(target_lengths, reduction, scorer.acc)
        if any(needs) and reduction != "none":  # the coefficients are known: one pass
            coef = weights
            if zero_infinity:
                coef = coef.masked_fill(~feasible_by_length(target_set, input_lengths), 0.0)
            ll, grads = scorer.one_pass(coef, needs)
            infeasible = ll == float("-inf")
            if zero_infinity:
                # Infeasible only by its values (-inf or NaN inputs) yet weighted in the pass:
                # redo the gradient the two-pass way. Never for finite inputs.
                if bool((infeasible & (coef != 0)).any()):
                    grads = _pass2(scorer, weights, infeasible, zero_infinity, needs)
                    grads = tuple(None if g is None else g.to(scorer.acc) for g in grads)
            else:
                grads = _poisoned(grads, infeasible, input_lengths)
            ctx.grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
        else:
            (ll,) = scorer.log_likelihoods(want_occupancy=any(needs))
            infeasible = ll == float("-inf")
        nll = -ll
        if zero_infinity:
            nll = nll.masked_fill(infeasible, 0.0)
        ctx.infeasible = infeasible
        if reduction == "none":
            if any(needs):  # per-sequence weights arrive with the backward: pass 2 waits
                ctx.scorer = scorer
            return nll
        return (nll * weights.to(nll.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        none = (None,) * 8
        if ctx.reduction == "none":
            grads = _pass2(ctx.scorer, grad_loss, ctx.infeasible, ctx.zero_infinity, ctx.needs)
            del ctx.scorer
            return grads + none
        return scale_gradients(ctx.grads, grad_loss) + none


def _poisoned(grads, infeasible, input_lengths):
    """NaN where an infeasible sequence (zero_infinity off) reaches a gradient: its frames'
    rows of the hidden gradient, and all of the weight's and bias' when it has any frame."""
    grad_hidden, grad_weight, grad_bias = grads
    nan = float("nan")
    if grad_hidden is not None:  # in place: a copy of the whole gradient would raise the op's peak
        live = torch.arange(grad_hidden.shape[1], device=infeasible.device)[None, :] < input_lengths[:, None]
        grad_hidden.masked_fill_((infeasible[:, None] & live)[..., None], nan)
    reaches = (infeasible & (input_lengths > 0)).any()  # stays on the device: no host sync
    for grad in (grad_weight, grad_bias):
        if grad is not None:
            grad.masked_fill_(reaches, nan)
    return grad_hidden, grad_weight, grad_bias


def _pass2(scorer: Scorer, coef, infeasible, zero_infinity, needs):
    coef = coef.to(scorer.acc)
    if zero_infinity:
        coef = coef.masked_fill(infeasible, 0.0)
    poison = infeasible if not zero_infinity else torch.zeros_like(infeasible)
    return scorer.gradients([coef], poison.contiguous(), needs)


def linear_ctc_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, input_lengths, target_lengths, blank: Optional[int] = None,
                    reduction: str = "mean", zero_infinity: bool = False, *,
                    chunk_frames: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """CTC loss of a linear head, equal to ``ctc_loss(log_softmax(hidden @ weight.T + bias)
    .transpose(0, 1), ...)`` with its gradients w.r.t. hidden, weight and bias, without the
    (B, T, V) logits.

    Args:
        hidden: (B, T, D) decoder states, batch-first; float32/float64, or bf16/fp16 (float32
            accumulation). Under ``torch.autocast`` the head's GEMMs run in the autocast dtype.
        weight: (V, D) head weight; bias: (V,) or None. V counts the blank.
        targets, input_lengths, target_lengths, reduction, zero_infinity: as ``ctc_loss``.
        blank: index of the blank class; default V - 1 (OpenOmni's convention).
        chunk_frames: frames per chunk (default: from the device, :func:`default_chunk_frames`).
        backend: ``"torch"`` | ``"cpu"`` | ``"triton"``; default by device.

    The gradient is formed during the forward (reductions mean/sum: in pass 1 itself, see the
    module docstring); under ``torch.no_grad()`` only pass 1 runs, without its GEMMs.
    """
    check_linear_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    blank = V - 1 if blank is None else check_int("blank", blank)
    targets, input_lengths, target_lengths = ctc_targets(
        targets, input_lengths, target_lengths, blank, T=T, B=B, C=V, device=hidden.device, name="hidden")
    check_choice("reduction", reduction, REDUCTIONS)
    check_bool("zero_infinity", zero_infinity)
    check_chunk_frames(chunk_frames)
    chosen = choose_backend(hidden.device, backend)
    device = hidden.device.type
    hidden, weight, bias = cast_all(matmul_dtype(device, hidden, weight, bias), (hidden, weight, bias))
    with autocast_off(device):
        return _LinearCTCFunction.apply(hidden, weight, bias, targets, input_lengths, target_lengths, blank,
                                        reduction, zero_infinity, chunk_frames, chosen)
