"""Fused linear-CTC benchmark: hidden -> head -> CTC loss -> gradients of hidden, weight, bias.

torch (``Linear`` + ``log_softmax`` + ``F.ctc_loss`` + backward) against
``omnifast.linear_ctc_loss``, which never holds the (B, T, V) logits. Float32, blank = V - 1.
Run ``python -m benchmarks.linear_ctc`` (``--quick`` for a smoke run)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import omnifast

from ._harness import Benchmark


def make_inputs(shape, device: torch.device, seed: int = 0):
    B, T, D, V, L = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(device)
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device)
    bias = torch.zeros(V).to(device)
    targets = torch.randint(0, V - 1, (B, L), generator=gen).to(device)
    input_lengths = torch.full((B,), T, dtype=torch.long, device=device)
    target_lengths = torch.full((B,), L, dtype=torch.long, device=device)
    return hidden, weight, bias, targets, input_lengths, target_lengths


def implementations(inputs, device):
    hidden, weight, bias, targets, input_lengths, target_lengths = inputs

    def leaves():
        return [t.detach().requires_grad_() for t in (hidden, weight, bias)]

    def torch_path():
        h, w, b = leaves()
        log_probs = F.linear(h, w, b).log_softmax(-1).transpose(0, 1)
        F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=w.shape[0] - 1).backward()

    def fused():
        h, w, b = leaves()
        omnifast.linear_ctc_loss(h, w, b, targets, input_lengths, target_lengths).backward()

    return {"torch": torch_path, "omnifast.linear_ctc_loss": fused}


BENCHMARK = Benchmark(
    op="linear_ctc",
    module="benchmarks.linear_ctc",
    fields="BTDVL",
    shapes=[(8, 800, 896, 6561, 300), (16, 1200, 896, 6561, 500)],
    quick_shapes=[(2, 40, 16, 50, 8)],
    make_inputs=make_inputs,
    implementations=implementations,
    description=__doc__,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
