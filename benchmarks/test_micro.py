"""The kernel microbenchmarks under pytest-benchmark: one test per op family and implementation,
at each shape of that family's benchmark script (``OMNIFAST_BENCH_QUICK=1``: its quick shapes),
on CUDA where there is one. From a checkout: ``pytest benchmarks --benchmark-only``, with
``--benchmark-save NAME`` to keep a run and ``--benchmark-compare`` to hold a change against it.
The scripts (``python -m benchmarks.<op>``) still write their tables and JSON; these give the same
calls pytest-benchmark's statistics, history and comparison."""

import importlib
import os

import pytest
import torch

FAMILIES = ("ctc", "linear_ctc", "ctc_dpo", "ar_dpo", "moe", "speech_decoder")
QUICK = bool(os.environ.get("OMNIFAST_BENCH_QUICK"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases():
    for family in FAMILIES:
        spec = importlib.import_module(f"benchmarks.{family}").BENCHMARK
        # the implementations a family compares, named on its smallest shape
        names = list(
            spec.implementations(spec.make_inputs(spec.quick_shapes[0], torch.device("cpu")), torch.device("cpu"))
        )
        for shape in spec.shapes_for(DEVICE, QUICK):
            for name in names:
                yield pytest.param(family, shape, name, id=f"{family}-{spec.case_name(shape)}-{name}")


@pytest.mark.parametrize("family, shape, implementation", list(_cases()))
def test_op(benchmark, family, shape, implementation):
    spec = importlib.import_module(f"benchmarks.{family}").BENCHMARK
    fns = spec.implementations(spec.make_inputs(shape, DEVICE), DEVICE)
    if implementation not in fns:
        pytest.skip(f"{implementation} does not run on {DEVICE}")
    fn = fns[implementation]

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{family} {spec.case_name(shape)}"
    benchmark(call)
