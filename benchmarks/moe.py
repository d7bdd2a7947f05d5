"""MoE benchmark: forward + backward of one MoE layer (output, input, weight and gate gradients).

``NaiveMoE`` (per-expert loop with masks and index_add) against ``omnifast.nn.MoE`` and a floor:
the expert GEMMs alone on pre-sorted rows. On the CPU the floor is ``expert_mlp`` on sorted rows
(one matmul per segment). On CUDA it is, for top-k layers, a pair of ``torch._grouped_mm`` calls
over the same routed rows (where the torch build has it), and for dense layers one GEMM pair over
all rows with every expert side by side; megablocks' dMoE joins when it is installed.

Cases: CPU, float32: OpenOmni's dense 4-expert layer and an 8-expert top-2 layer. CUDA, bf16:
top-2 of 8 at 16k and 64k tokens, top-8 of 64 fine-grained experts (H2048 F1024), OpenOmni's
dense split-4 speech projector (H3584 -> 4 x 896), and the top-2 layer in float32.
Run ``python -m benchmarks.moe`` (``--device cuda`` on a GPU)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from omnifast.nn import MoE, NaiveMoE
from omnifast.ops import moe as moe_ops

from ._harness import Benchmark

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(shape, device: torch.device, seed: int = 0):
    N, H, F_, O, E, K, split, dtype = shape
    torch.manual_seed(seed)
    naive = NaiveMoE(H, F_, O, experts=E, top_k=K or None, split_tokens=split).to(device, DTYPES[dtype])
    moe = MoE.from_naive(naive)
    x = torch.randn(N, H, device=device, dtype=DTYPES[dtype])
    return naive, moe, x


def _grouped_mm_pair(moe: MoE, x: torch.Tensor):
    """torch._grouped_mm forward and backward of the expert MLP on the routed rows, pre-sorted."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return None
    routing = moe_ops.route(x, moe.gate.weight, moe.top_k)
    sorted_x = moe_ops.permute(x, routing).detach().contiguous()
    offs = routing.offsets[1:].to(torch.int32)
    w1, w2 = moe.w1.detach(), moe.w2.detach()
    probe = torch.randn(sorted_x.shape[0], w2.shape[1], device=x.device, dtype=x.dtype)

    def run():
        z, a, b = (t.detach().requires_grad_() for t in (sorted_x, w1, w2))
        hidden = F.relu(torch._grouped_mm(z, a.transpose(1, 2), offs=offs))
        (torch._grouped_mm(hidden, b.transpose(1, 2), offs=offs) * probe).sum().backward()

    return run


def _dense_gemm_pair(moe: MoE, x: torch.Tensor):
    """One GEMM pair over all rows, the experts side by side: the dense layer's floor."""
    E, F_, H = moe.w1.shape
    w1 = moe.w1.detach().reshape(E * F_, H)
    w2 = moe.w2.detach().permute(1, 0, 2).reshape(moe.w2.shape[1], E * F_)
    probe = torch.randn(x.shape[0], w2.shape[0], device=x.device, dtype=x.dtype)

    def run():
        z, a, b = (t.detach().requires_grad_() for t in (x, w1, w2))
        (F.linear(F.relu(F.linear(z, a)), b) * probe).sum().backward()

    return run


def implementations(inputs, device):
    naive, moe, x = inputs

    def step(module):
        def run():
            z = x.detach().requires_grad_()
            module.zero_grad(set_to_none=True)
            module(z).output.float().sum().backward()

        return run

    impls = {"NaiveMoE": step(naive), "omnifast.nn.MoE": step(moe)}
    floor = None
    if device.type == "cuda":
        floor = _dense_gemm_pair(moe, x) if moe.top_k is None else _grouped_mm_pair(moe, x)
    if floor is not None:
        impls["GEMM floor"] = floor
    else:
        routing = moe_ops.route(x, moe.gate.weight, moe.top_k)
        if moe.top_k is None:  # dense: every expert sees all tokens
            sorted_x = x.repeat(moe.experts, 1)
            offsets = torch.arange(moe.experts + 1, device=x.device) * x.shape[0]
        else:
            sorted_x = moe_ops.permute(x, routing)
            offsets = routing.offsets
        weights = [p.detach() for p in moe.expert_parameters()]

        def lower_bound():
            z = sorted_x.detach().requires_grad_()
            w1, b1, w2, b2 = (w.requires_grad_() for w in weights)
            moe_ops.expert_mlp(z, offsets, w1, b1, w2, b2, moe.activation).sum().backward()

        impls["matmul lower bound"] = lower_bound
    dmoe = _megablocks_dmoe(moe, x.device)
    if dmoe is not None:

        def megablocks():
            z = x.detach().view(x.shape[0], 1, -1).requires_grad_()
            dmoe.zero_grad(set_to_none=True)
            dmoe(z)[0].float().sum().backward()

        impls["megablocks dMoE"] = megablocks
    return impls


def _megablocks_dmoe(moe: MoE, device: torch.device):
    """megablocks' dropless MoE of the same size, when on CUDA with megablocks installed."""
    if device.type != "cuda" or moe.out != moe.hidden or moe.top_k is None:
        return None
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError:
        return None
    args = Arguments(
        hidden_size=moe.hidden,
        ffn_hidden_size=moe.ffn,
        moe_num_experts=moe.experts,
        moe_top_k=moe.top_k,
        mlp_impl="grouped",
        activation_fn=torch.relu,
        device=device,
        bf16=moe.w1.dtype == torch.bfloat16,
    )
    return dMoE(args)


BENCHMARK = Benchmark(
    op="moe",
    module="benchmarks.moe",
    fields=("N", "H", "F", "O", "E", "K", "split", "dtype"),
    shapes=[
        (4096, 896, 3584, 896, 4, 0, 1, "fp32"),
        (4096, 896, 3584, 896, 8, 2, 1, "fp32"),
        (16384, 896, 3584, 896, 4, 0, 1, "fp32"),
        (16384, 896, 3584, 896, 8, 2, 1, "fp32"),
    ],
    cuda_shapes=[
        (16384, 896, 3584, 896, 8, 2, 1, "bf16"),
        (65536, 896, 3584, 896, 8, 2, 1, "bf16"),
        (16384, 2048, 1024, 2048, 64, 8, 1, "bf16"),
        (16384, 3584, 3584, 3584, 4, 0, 4, "bf16"),
        (16384, 896, 3584, 896, 8, 2, 1, "fp32"),
    ],
    quick_shapes=[(64, 16, 32, 16, 4, 0, 1, "fp32"), (64, 16, 32, 16, 8, 2, 1, "fp32")],
    make_inputs=make_inputs,
    implementations=implementations,
    baseline="NaiveMoE",
    description=__doc__,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
