"""Fused linear-CTC's three building blocks on the kernels of ``ctc.py`` (the matmuls stay in
torch): a chunk's log-sum-exp and state emissions, the recursion on given emissions (met in the
middle, the occupancies written over the emissions: two (B, T, S) buffers, T dependent steps for
every target set at once), and the chunk's gradient written over its logits. Chunks are (B, t, V),
float32, or bf16/fp16 under autocast: the kernels read them in their own dtype and do the
arithmetic in float32, so no float32 copy of a half-precision chunk is made. Contracts: the
functions of the same names in ``omnifast/ops/_reference.py``. The passes over a chunk's logits
are a small part of its GEMMs' time (``docs/perf.md``).
"""

from __future__ import annotations

import torch

from ._util import as_int32
from .ctc import emissions, extended_labels, gradient_rows, recursion, sorted_states


def chunk_emissions(logits, t0, input_lengths, exts, target_lengths, emissions_out):
    B, ct, _ = logits.shape
    acc = emissions_out[0].dtype
    lse = torch.zeros(B, ct, dtype=acc, device=logits.device)
    (in_len,) = as_int32(input_lengths)
    for k, (ext, lengths, out) in enumerate(zip(exts, target_lengths, emissions_out)):
        emissions(logits, lse, *as_int32(ext, lengths), in_len, out, t0, "read" if k else "compute")
    return lse


def ctc_states(emissions_in, targets, input_lengths, target_lengths, blank, want_occupancy):
    ext = extended_labels(targets, target_lengths, blank)
    in_len, tgt_len = as_int32(input_lengths, target_lengths)
    return recursion(emissions_in, ext, tgt_len, in_len, occupancy=want_occupancy)


def chunk_grad(logits, lse, t0, input_lengths, softmax_coef, exts, target_lengths, occupancies, coefs, poison):
    (in_len,) = as_int32(input_lengths)
    poison = poison.to(torch.int8).contiguous()
    acc = occupancies[0].dtype
    softmax_coef = softmax_coef.to(acc).contiguous()
    # With several target sets the label columns are updated once per set: do that in float32
    # and round a half-precision chunk once at the end, not once per set.
    grad = logits if len(exts) == 1 or logits.dtype == acc else torch.empty_like(logits, dtype=acc)
    for k, (ext, lengths, occ, coef) in enumerate(zip(exts, target_lengths, occupancies, coefs)):
        order, labels = sorted_states(ext, lengths)
        (tgt_len,) = as_int32(lengths)
        gradient_rows(
            logits,
            grad,
            lse,
            occ,
            order,
            labels,
            tgt_len,
            in_len,
            softmax_coef,
            coef.to(acc).contiguous(),
            poison,
            t0,
            base=k == 0,
            softmax=True,
        )
    if grad is not logits:
        logits.copy_(grad)
