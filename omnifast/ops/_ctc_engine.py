"""The chunked CTC engine behind fused linear-CTC and CTC-DPO: a linear head's logits formed one
time chunk at a time, the emissions of every target set gathered from each chunk, one recursion
over all sets, and the logits gradient formed chunk by chunk and multiplied straight into the
gradients of the hidden states, the weight and the bias. The (B, T, V) logits never exist.

``Scorer`` runs the passes; ``softmax_part`` and ``labels_part`` are the two halves of a CTC logits
gradient (coef * softmax, and -coef * occupancy at the labels) as named calls on a backend's
``chunk_grad``. Chunk and group sizes come from the device (``default_chunk_frames``,
``working_set_bytes``, ``even_groups``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import linear_ctc_kernels
from ._precision import accumulation_dtype
from ._reference import extended_labels

CHUNK_ELEMENTS = 1 << 22  # CPU: logits per chunk, 16 MiB in float32 (measured fastest there)
GPU_CHUNK_BYTES = 64 << 20  # CUDA: at most this much of logits per chunk ...
GPU_CHUNK_ROWS_PER_SM = 32  # ... aiming at 32 rows per multiprocessor, so a chunk's GEMMs fill the GPU


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


def default_chunk_frames(
    batch: int, hidden: int, vocab: int, device: Optional[torch.device] = None, itemsize: int = 4
) -> int:
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
    return [
        s
        if s.targets.shape[1] == width
        else make_target_set(F.pad(s.targets, (0, width - s.targets.shape[1]), value=blank), s.lengths, blank)
        for s in sets
    ]


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

    def __init__(
        self,
        hidden,
        weight,
        bias,
        input_lengths,
        sets: Sequence[TargetSet],
        blank: int,
        chunk_frames: Optional[int],
        backend: str,
    ):
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
            rows = self.hidden[:, t0 : t0 + self.chunk]
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
            lse = self.kernels.chunk_emissions(
                logits, t0, self.input_lengths, exts, lengths, [s.states for s in self.sets]
            )
            self.lse[:, t0 : t0 + logits.shape[1]] = lse
            del logits  # the last chunk is not kept alive through the recursion
        # Every target set in one recursion (K * B sequences): T dependent steps, not K * T.
        ll = self.kernels.ctc_states(
            states.view(-1, T, states.shape[-1]),
            torch.cat([s.targets for s in self.sets]),
            self.input_lengths.repeat(len(self.sets)),
            torch.cat([s.lengths for s in self.sets]),
            self.blank,
            want_occupancy,
        )
        return list(ll.split(B))

    def _accumulate(self, grad_logits, rows, t0, grad_hidden, grad_weight, grad_bias) -> None:
        """Add one chunk's logits gradient (B, ct, V), in the matmul dtype, into the gradients
        of hidden (its frames written), weight and bias (float32 accumulators)."""
        ct = grad_logits.shape[1]
        flat = grad_logits.reshape(-1, grad_logits.shape[-1])
        if grad_hidden is not None:
            grad_hidden[:, t0 : t0 + ct] = grad_logits @ self.weight
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
            self.kernels.chunk_grad(
                logits,
                self.lse[:, t0 : t0 + ct].contiguous(),
                t0,
                self.input_lengths,
                softmax_coef,
                exts,
                lengths,
                states,
                coefs,
                poison,
            )
            self._accumulate(logits.to(self.hidden.dtype), rows, t0, grad_hidden, grad_weight, grad_bias)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(self.weight.dtype),
            None if grad_bias is None else grad_bias.to(self.bias.dtype),
        )

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
        to_softmax = softmax_part(self.kernels, B, T, acc, device)
        for t0, rows, logits in self._chunks():
            ct = logits.shape[1]
            self.lse[:, t0 : t0 + ct] = self.kernels.chunk_emissions(
                logits, t0, self.input_lengths, [target_set.ext], [target_set.lengths], [states]
            )
            to_softmax(logits, self.lse[:, t0 : t0 + ct].contiguous(), t0, self.input_lengths, coef)
            self._accumulate(logits.to(mm), rows, t0, grad_hidden, grad_weight, grad_bias)
            del logits
        ll = self.kernels.ctc_states(
            states, target_set.targets, self.input_lengths, target_set.lengths, self.blank, True
        )
        K = 1 + target_set.targets.shape[1]
        group = label_group(B, T, K, D, device, self.hidden.element_size())
        for start in range(0, B, group):
            stop = min(B, start + group)
            columns, (local_targets,) = label_columns(
                self.blank, [target_set], torch.arange(start, stop, device=device)
            )
            local = make_target_set(local_targets, target_set.lengths[start:stop], 0)
            G = stop - start
            block = torch.zeros(G, T, K, dtype=acc, device=device)
            labels_part(
                self.kernels, block, self.input_lengths[start:stop], [local], [states[start:stop]], [coef[start:stop]]
            )
            block = block.to(mm)
            if grad_hidden is not None:
                grad_hidden[start:stop] += torch.bmm(block, self.weight[columns])
            if grad_weight is not None:
                update = torch.bmm(block.transpose(1, 2), self.hidden[start:stop]).flatten(0, 1)
                grad_weight.index_add_(0, columns.flatten(), update.to(acc))
            if grad_bias is not None:
                grad_bias.index_add_(0, columns.flatten(), block.sum(1, dtype=acc).flatten())
        return ll, (grad_hidden, grad_weight, grad_bias)


def label_group(B: int, T: int, K: int, D: int, device: torch.device, itemsize: int) -> int:
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


def softmax_part(kernels, B: int, T: int, acc: torch.dtype, device: torch.device):
    """``apply(logits, lse, t0, input_lengths, coef)``: overwrite the (B, t, V) logits of frames
    [t0, t0 + t) of T with ``coef[b] * softmax`` (rows past an input length: 0), given their
    log-sum-exp (B, t): the dense part of every CTC logits gradient. What the backend's
    ``chunk_grad`` needs besides (a target set of the blank state alone, weighted 0) is built once,
    for every chunk of a pass."""
    no_labels = make_target_set(
        torch.zeros(B, 0, dtype=torch.int64, device=device), torch.zeros(B, dtype=torch.int64, device=device), 0
    )
    no_occupancy = torch.zeros(B, T, 1, dtype=acc, device=device)
    zero = torch.zeros(B, dtype=acc, device=device)
    no_poison = torch.zeros(B, dtype=torch.bool, device=device)

    def apply(logits, lse, t0, input_lengths, coef) -> None:
        kernels.chunk_grad(
            logits,
            lse,
            t0,
            input_lengths,
            coef,
            [no_labels.ext],
            [no_labels.lengths],
            [no_occupancy],
            [zero],
            no_poison,
        )

    return apply


def labels_part(kernels, grad, input_lengths, sets: Sequence[TargetSet], occupancies, coefs, poison=None) -> None:
    """Into zeroed (B, T, K) ``grad`` over K label columns: ``-coef_k[b] * sum of set k's
    occupancies at each column``, the whole gradient of scores that have no normaliser (sparse
    CTC-DPO) or the labels' part of one that has. ``sets`` hold targets numbered in those K
    columns; ``poison`` (B,) marks sequences whose rows become NaN."""
    B, T, _ = grad.shape
    acc = occupancies[0].dtype
    # a normaliser of +inf makes the softmax base exp(x - inf) = 0: only the labels' terms remain
    normaliser = torch.full((B, T), float("inf"), dtype=acc, device=grad.device)
    if poison is None:
        poison = torch.zeros(B, dtype=torch.bool, device=grad.device)
    kernels.chunk_grad(
        grad,
        normaliser,
        0,
        input_lengths,
        torch.zeros(B, dtype=acc, device=grad.device),
        [s.ext for s in sets],
        [s.lengths for s in sets],
        list(occupancies),
        list(coefs),
        poison.contiguous(),
    )
