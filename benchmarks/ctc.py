"""CTC benchmark: logits -> loss -> logits gradient.

torch (``log_softmax`` + ``F.ctc_loss`` + backward) against omnifast's drop-in ``ctc_loss``
(fed the same ``log_softmax``) and ``ctc_loss_with_logits``; on CUDA also cuDNN's CTC where it
applies (targets of at most 256; labels rolled so that blank is 0). Run
``python -m benchmarks.ctc`` (``--quick`` for a smoke run)."""

from __future__ import annotations

import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import omnifast

from ._harness import Benchmark


def make_inputs(shape, device: torch.device, seed: int = 0):
    B, T, V, L = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, V, generator=gen).to(device)
    targets = torch.randint(0, V - 1, (B, L), generator=gen).to(device)  # blank = V - 1
    input_lengths = torch.full((B,), T, dtype=torch.long, device=device)
    target_lengths = torch.full((B,), L, dtype=torch.long, device=device)
    return logits, targets, input_lengths, target_lengths


def implementations(inputs, device: torch.device) -> Dict[str, Callable[[], object]]:
    logits, targets, input_lengths, target_lengths = inputs
    blank = logits.shape[-1] - 1

    def torch_ctc():
        x = logits.detach().requires_grad_()
        F.ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths, blank=blank).backward()

    def drop_in():
        x = logits.detach().requires_grad_()
        omnifast.ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths, blank=blank).backward()

    def fused():
        x = logits.detach().requires_grad_()
        omnifast.ctc_loss_with_logits(x, targets, input_lengths, target_lengths, blank=blank).backward()

    impls = {"torch": torch_ctc, "omnifast.ctc_loss": drop_in, "omnifast.ctc_loss_with_logits": fused}
    if device.type == "cuda" and targets.shape[1] < 256:
        # cuDNN's CTC (torch's _cudnn_ctc_loss_tensor): blank 0, float32, concatenated int32 targets
        # and int32 lengths on the GPU, all input lengths equal, targets shorter than 256.
        flat = ((targets + 1) % logits.shape[-1]).flatten().to(torch.int32)
        in32, tl32 = input_lengths.to(torch.int32), target_lengths.to(torch.int32)
        rolled = logits.roll(1, dims=-1)

        def cudnn_ctc():
            x = rolled.detach().requires_grad_()
            F.ctc_loss(x.log_softmax(-1), flat, in32, tl32, blank=0).backward()

        impls["torch (cuDNN)"] = cudnn_ctc
    return impls


BENCHMARK = Benchmark(
    op="ctc",
    module="benchmarks.ctc",
    fields="BTVL",
    shapes=[(8, 400, 1024, 150), (8, 800, 6561, 300), (16, 1200, 6561, 500), (32, 1500, 6561, 600)],
    quick_shapes=[(2, 50, 64, 10), (2, 80, 128, 20)],
    make_inputs=make_inputs,
    implementations=implementations,
    description=__doc__,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
