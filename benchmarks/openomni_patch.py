"""OpenOmni's own training step with and without ``omnifast.openomni.patch``: its speech
generator (stage 4, CTC) and its DPO (stage 5: four generator calls against a frozen copy),
forward and backward, on OpenOmni's modules rebuilt from its code (``omnifast/openomni/reference.py``) at a
quarter of its decoder width with its 151,936-word text vocabulary, 12x upsampling and 6561 units.
The patched step computes the same loss and gradients (tests/nn/test_openomni.py).
Run ``python -m benchmarks.openomni_patch`` (``--quick`` for a smoke run)."""

from __future__ import annotations

import copy
import sys

import torch

from omnifast.nn import SpeechDecoderConfig
from omnifast.openomni import patch
from omnifast.openomni import reference as openomni

from ._harness import Benchmark


def config(quick: bool) -> SpeechDecoderConfig:
    if quick:
        return SpeechDecoderConfig.tiny(upsample_factor=12, kv_heads=4)
    return SpeechDecoderConfig(
        llm_hidden=512,
        width=224,
        fusion_heads=16,
        fusion_head_dim=64,
        layers=6,
        heads=14,
        kv_heads=14,
        intermediate=1216,
    )


def make_inputs(shape, device, seed=0):
    B, N, U, stage, quick = shape
    c = config(bool(quick))
    torch.manual_seed(seed)
    model = openomni.OpenOmniModel(c, dpo=stage == "dpo").to(device)
    hidden = torch.randn(B, N + 8, c.llm_hidden, device=device)
    labels = torch.full((B, N + 8), -100, device=device)
    labels[:, 4 : 4 + N] = 1
    text_tokens = torch.randint(0, min(c.text_vocab, 1000), (B, N - 2), device=device)
    chosen = torch.randint(0, c.units, (B, U), device=device)
    rejected = torch.randint(0, c.units, (B, U - U // 5), device=device)
    return model, (hidden, labels, chosen, rejected, text_tokens)


def implementations(inputs, device):
    model, args = inputs
    patched = patch(copy.deepcopy(model))

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(*args).backward()

        return run

    return {"OpenOmni": step(model), "OpenOmni + omnifast.openomni.patch": step(patched)}


BENCHMARK = Benchmark(
    op="openomni_patch",
    module="benchmarks.openomni_patch",
    fields=("B", "N", "U", "stage", "quick"),
    shapes=[(4, 40, 400, "ctc", 0), (4, 40, 400, "dpo", 0)],
    quick_shapes=[(2, 6, 30, "ctc", 1), (2, 6, 30, "dpo", 1)],
    make_inputs=make_inputs,
    implementations=implementations,
    baseline="OpenOmni",
    description=__doc__,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
