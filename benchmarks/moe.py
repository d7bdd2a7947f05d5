"""MoE benchmark: forward + backward of one MoE layer (output, input, weight and gate gradients).

``NaiveMoE`` (per-expert loop with masks and index_add) against ``omnifast.nn.MoE``, and the
lower bound: the same expert matmuls on pre-sorted contiguous inputs, timed alone. On CUDA,
megablocks' dMoE too when it is installed. Cases: OpenOmni's dense 4-expert layer and an
8-expert top-2 layer, float32. Run ``python -m omnifast.benchmarks.moe``."""
from __future__ import annotations

import sys

import torch

from omnifast.nn import MoE, NaiveMoE
from omnifast.ops import moe as moe_ops

from ._harness import Benchmark


def make_inputs(shape, device: torch.device, seed: int = 0):
    N, H, F, O, E, K = shape
    torch.manual_seed(seed)
    naive = NaiveMoE(H, F, O, experts=E, top_k=K or None).to(device)
    moe = MoE.from_naive(naive)
    x = torch.randn(N, H, device=device)
    return naive, moe, x


def implementations(inputs, device):
    naive, moe, x = inputs
    routing = moe_ops.route(x, moe.gate.weight, moe.top_k)
    if moe.top_k is None:  # dense: every expert sees all tokens
        sorted_x = x.repeat(moe.experts, 1)
        offsets = torch.arange(moe.experts + 1, device=x.device) * x.shape[0]
    else:
        sorted_x = moe_ops.permute(x, routing)
        offsets = routing.offsets
    weights = [p.detach() for p in moe.expert_parameters()]

    def step(module):
        def run():
            z = x.detach().requires_grad_()
            module.zero_grad(set_to_none=True)
            module(z).output.sum().backward()
        return run

    def lower_bound():
        z = sorted_x.detach().requires_grad_()
        w1, b1, w2, b2 = (w.requires_grad_() for w in weights)
        moe_ops.expert_mlp(z, offsets, w1, b1, w2, b2, moe.activation).sum().backward()

    impls = {"NaiveMoE": step(naive), "omnifast.nn.MoE": step(moe), "matmul lower bound": lower_bound}
    dmoe = _megablocks_dmoe(moe, x.device)
    if dmoe is not None:
        def megablocks():
            z = x.detach().view(x.shape[0], 1, -1).requires_grad_()
            dmoe.zero_grad(set_to_none=True)
            dmoe(z)[0].sum().backward()
        impls["megablocks dMoE"] = megablocks
    return impls


def _megablocks_dmoe(moe: MoE, device: torch.device):
    """megablocks' dropless MoE of the same size, when on CUDA with megablocks installed."""
    if device.type != "cuda" or moe.out != moe.hidden:
        return None
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError:
        return None
    args = Arguments(hidden_size=moe.hidden, ffn_hidden_size=moe.ffn, moe_num_experts=moe.experts,
                     moe_top_k=moe.top_k or moe.experts, mlp_impl="grouped", activation_fn=torch.relu,
                     device=device)
    return dMoE(args)


BENCHMARK = Benchmark(
    op="moe", module="omnifast.benchmarks.moe", fields="NHFOEK",
    shapes=[(4096, 896, 3584, 896, 4, 0), (4096, 896, 3584, 896, 8, 2),
            (16384, 896, 3584, 896, 4, 0), (16384, 896, 3584, 896, 8, 2)],
    quick_shapes=[(64, 16, 32, 16, 4, 0), (64, 16, 32, 16, 8, 2)],
    make_inputs=make_inputs, implementations=implementations, baseline="NaiveMoE", description=__doc__)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
