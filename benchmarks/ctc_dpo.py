"""CTC-DPO benchmark: one preference step of the speech head, loss and gradients.

Baseline: OpenOmni's recipe, four ``F.ctc_loss`` calls on full logits (the frozen reference
head and the policy head, chosen and rejected) and the DPO loss on top. omnifast: the
reference log-likelihoods are cached (computed once, as training does), the policy scored by
``ctc_dpo_loss`` in one pass; without length normalisation it takes the sparse path (logits
only for each pair's own columns), with it (``-norm`` rows, OpenOmni's setting) the dense fused
path. Float32, beta 0.1, blank = V - 1. Run ``python -m benchmarks.ctc_dpo``."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import omnifast

from . import linear_ctc
from ._harness import Benchmark


def make_inputs(shape, device: torch.device, seed: int = 0):
    hidden, weight, bias, chosen, input_lengths, lengths = linear_ctc.make_inputs(shape, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rejected = torch.randint(0, weight.shape[0] - 1, chosen.shape, generator=gen).to(device)
    ref_weight = weight + 0.01 * torch.randn(weight.shape, generator=gen).to(device)
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        ref_weight=ref_weight,
        chosen=chosen,
        rejected=rejected,
        input_lengths=input_lengths,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
    )


def recipe(x, length_normalize, beta=0.1):
    """OpenOmni-style: full logits for reference (no grad) and policy, four F.ctc_loss calls."""
    h, w, b = (t.detach().requires_grad_() for t in (x["hidden"], x["weight"], x["bias"]))
    blank = w.shape[0] - 1

    def logps(log_probs):
        out = []
        for units, lengths in ((x["chosen"], x["chosen_lengths"]), (x["rejected"], x["rejected_lengths"])):
            ll = -F.ctc_loss(log_probs, units, x["input_lengths"], lengths, blank=blank, reduction="none")
            out.append(ll / lengths if length_normalize else ll)
        return out

    with torch.no_grad():
        ref_w, ref_l = logps(F.linear(x["hidden"], x["ref_weight"], x["bias"]).log_softmax(-1).transpose(0, 1))
    pw, pl = logps(F.linear(h, w, b).log_softmax(-1).transpose(0, 1))
    (-F.logsigmoid(beta * ((pw - ref_w) - (pl - ref_l)))).mean().backward()


def implementations(x, device):
    with torch.no_grad():  # cached once before training, as ReferenceLogpCache does
        refs = {
            norm: omnifast.ops.reference_logps(
                x["hidden"],
                x["ref_weight"],
                x["bias"],
                x["chosen"],
                x["rejected"],
                x["input_lengths"],
                x["chosen_lengths"],
                x["rejected_lengths"],
                length_normalize=norm,
            )
            for norm in (False, True)
        }

    def ours(length_normalize):
        def run():
            h, w, b = (t.detach().requires_grad_() for t in (x["hidden"], x["weight"], x["bias"]))
            out = omnifast.ctc_dpo_loss(
                h,
                w,
                b,
                x["chosen"],
                x["rejected"],
                x["input_lengths"],
                x["chosen_lengths"],
                x["rejected_lengths"],
                *refs[length_normalize],
                length_normalize=length_normalize,
            )
            out.loss.backward()

        return run

    return {
        "torch": lambda: recipe(x, False),
        "omnifast (sparse)": ours(False),
        "torch -norm": lambda: recipe(x, True),
        "omnifast (dense) -norm": ours(True),
    }


BENCHMARK = Benchmark(
    op="ctc_dpo",
    module="benchmarks.ctc_dpo",
    fields="BTDVL",
    shapes=[(8, 800, 896, 6561, 300), (16, 1200, 896, 6561, 500)],
    quick_shapes=[(2, 40, 16, 50, 8)],
    make_inputs=make_inputs,
    implementations=implementations,
    description=__doc__,
    baselines={"torch -norm": "torch -norm", "omnifast (dense) -norm": "torch -norm"},
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
