"""CTC benchmark: logits -> loss -> logits gradient.

torch (``log_softmax`` + ``F.ctc_loss`` + backward) against omnifast's drop-in ``ctc_loss``
(fed the same ``log_softmax``) and ``ctc_loss_with_logits``; on CUDA also cuDNN's CTC where it
applies (blank 0, targets of at most 256). Run ``python -m omnifast.benchmarks.ctc`` (``--quick``
for a smoke run)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import omnifast

from . import _harness

MODULE = "omnifast.benchmarks.ctc"
SHAPES = [(8, 400, 1024, 150), (8, 800, 6561, 300), (16, 1200, 6561, 500), (32, 1500, 6561, 600)]
QUICK_SHAPES = [(2, 50, 64, 10), (2, 80, 128, 20)]
BASELINE = "torch"


def make_inputs(shape: Tuple[int, int, int, int], device: torch.device, seed: int = 0):
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

    impls = {BASELINE: torch_ctc, "omnifast.ctc_loss": drop_in, "omnifast.ctc_loss_with_logits": fused}
    if device.type == "cuda" and targets.shape[1] <= 256:
        # cuDNN wants blank 0, int32 concatenated targets on the CPU: relabel so blank is 0.
        flat = ((targets + 1) % logits.shape[-1]).flatten().to("cpu", torch.int32)
        in32, tl32 = input_lengths.to("cpu", torch.int32), target_lengths.to("cpu", torch.int32)
        rolled = logits.roll(1, dims=-1)

        def cudnn_ctc():
            x = rolled.detach().requires_grad_()
            F.ctc_loss(x.log_softmax(-1), flat, in32, tl32, blank=0).backward()
        impls["torch (cuDNN)"] = cudnn_ctc
    return impls


def case_name(shape) -> str:
    return "B={} T={} V={} L={}".format(*shape)


def run(shapes: List[Tuple[int, int, int, int]], device: torch.device, repeats: int, memory: bool) -> Dict:
    rows = []
    for index, shape in enumerate(shapes):
        inputs = make_inputs(shape, device)
        times = _harness.time_alternating(implementations(inputs, device), device, repeats)
        results = _harness.summarise(times, BASELINE)
        del inputs
        if memory:
            for name in results:
                results[name]["peak_bytes"] = _harness.peak_memory_subprocess(
                    MODULE, index if shapes is SHAPES else -1 - index, name, str(device))
        rows.append({"case": case_name(shape), "shape": dict(zip("BTVL", shape)), "results": results})
        print(f"done: {case_name(shape)}", file=sys.stderr)
    return {"op": "ctc", "baseline": BASELINE, "dtype": "float32", "blank": "V-1",
            "environment": _harness.environment(device), "repeats": repeats, "cases": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--out", default=str(_harness.RESULTS))
    parser.add_argument("--memory-of", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_of:  # child process: one implementation, once, on fresh inputs
        case, impl = int(args.memory_of[0]), args.memory_of[1]
        shape = SHAPES[case] if case >= 0 else QUICK_SHAPES[-1 - case]
        fn = implementations(make_inputs(shape, device), device)[impl]
        print(_harness.peak_memory_here(fn, device))
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    payload = run(shapes, device, 2 if args.quick and args.repeats == 5 else args.repeats, not args.no_memory)
    _harness.print_table("ctc", payload["cases"], BASELINE)
    from pathlib import Path
    path = _harness.write_results("quick_ctc" if args.quick else "ctc", payload, BASELINE, Path(args.out))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
