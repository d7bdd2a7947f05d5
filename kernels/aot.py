"""Compile every Triton kernel ahead of time for real GPUs (no GPU needed) and report the
registers, spills and shared memory of each, e.g. ``python -m omnifast.kernels.aot``.

Run without ``TRITON_INTERPRET=1``: the interpreter replaces ``@triton.jit`` functions with
Python ones that cannot be compiled.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import ctc, fsq, linear_ctc, moe


@dataclass
class Case:
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4  # as launched by the wrapper


def _alpha_case(name: str, x_dtype: str, acc: str, from_logits: bool, gather: bool) -> Case:
    return Case(name, ctc._ctc_alpha_kernel, {
        "x_ptr": f"*{x_dtype}", "lse_ptr": f"*{acc}", "tgt_ptr": "*i32", "in_len_ptr": "*i32",
        "tgt_len_ptr": "*i32", "emit_ptr": f"*{acc}", "alpha_ptr": f"*{acc}", "ll_ptr": f"*{acc}",
        "T": "i32", "B": "i32", "C": "i32", "tgt_width": "i32", "S_max": "i32", "blank": "i32",
        "FROM_LOGITS": "constexpr", "BLOCK_S": "constexpr", "GATHER": "constexpr"},
        {"FROM_LOGITS": from_logits, "BLOCK_S": 1024, "GATHER": gather}, num_warps=8)


def _beta_case(name: str, acc: str, occupancy_out: bool) -> Case:
    return Case(name, ctc._ctc_beta_grad_kernel, {
        "tgt_ptr": "*i32", "in_len_ptr": "*i32", "tgt_len_ptr": "*i32", "emit_ptr": f"*{acc}",
        "alpha_ptr": f"*{acc}", "beta_ptr": f"*{acc}", "ll_ptr": f"*{acc}", "scale_ptr": f"*{acc}",
        "grad_ptr": f"*{acc}", "T": "i32", "B": "i32", "C": "i32", "tgt_width": "i32", "S_max": "i32",
        "blank": "i32", "BLOCK_S": "constexpr", "OCCUPANCY_OUT": "constexpr"},
        {"BLOCK_S": 1024, "OCCUPANCY_OUT": occupancy_out}, num_warps=8)


def _ctc_cases() -> List[Case]:
    cases = [_beta_case(f"ctc_beta_grad[{acc}]", acc, False) for acc in ("fp32", "fp64")]
    for dtype, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        for from_logits in (False, True):
            tag = f"{dtype},{'logits' if from_logits else 'log_probs'}"
            cases.append(_alpha_case(f"ctc_alpha[{tag}]", dtype, acc, from_logits, gather=True))
            for zero_infinity in (False, True):
                cases.append(Case(f"ctc_grad_init[{tag},zero_infinity={zero_infinity}]", ctc._ctc_grad_init_kernel, {
                    "x_ptr": f"*{dtype}", "lse_ptr": f"*{acc}", "in_len_ptr": "*i32", "ll_ptr": f"*{acc}",
                    "scale_ptr": f"*{acc}", "grad_ptr": f"*{acc}", "B": "i32", "C": "i32",
                    "ZERO_INFINITY": "constexpr", "FROM_LOGITS": "constexpr", "BLOCK_C": "constexpr"},
                    {"ZERO_INFINITY": zero_infinity, "FROM_LOGITS": from_logits, "BLOCK_C": 2048}))
        cases.append(Case(f"row_logsumexp[{dtype}]", ctc._row_logsumexp_kernel, {
            "x_ptr": f"*{dtype}", "lse_ptr": f"*{acc}", "in_len_ptr": "*i32", "B": "i32", "C": "i32",
            "BLOCK_C": "constexpr"}, {"BLOCK_C": 2048}))
    return cases


def _linear_ctc_cases() -> List[Case]:
    cases = []
    for acc in ("fp32", "fp64"):
        for lse_given in (False, True):
            cases.append(Case(f"chunk_emissions[{acc},lse_given={lse_given}]", linear_ctc._chunk_emissions_kernel, {
                "logits_ptr": f"*{acc}", "lse_ptr": f"*{acc}", "in_len_ptr": "*i32", "ext_ptr": "*i32",
                "tgt_len_ptr": "*i32", "emit_ptr": f"*{acc}", "ct": "i32", "V": "i32", "T": "i32",
                "S_max": "i32", "t0": "i32", "LSE_GIVEN": "constexpr", "BLOCK_V": "constexpr",
                "BLOCK_S": "constexpr"}, {"LSE_GIVEN": lse_given, "BLOCK_V": 2048, "BLOCK_S": 1024}))
        cases.append(Case(f"chunk_softmax[{acc}]", linear_ctc._chunk_softmax_kernel, {
            "logits_ptr": f"*{acc}", "lse_ptr": f"*{acc}", "in_len_ptr": "*i32", "coef_ptr": f"*{acc}",
            "poison_ptr": "*i8", "ct": "i32", "V": "i32", "t0": "i32", "BLOCK_V": "constexpr"}, {"BLOCK_V": 2048}))
        cases.append(Case(f"chunk_scatter[{acc}]", linear_ctc._chunk_scatter_kernel, {
            "grad_ptr": f"*{acc}", "in_len_ptr": "*i32", "poison_ptr": "*i8", "ext_ptr": "*i32",
            "tgt_len_ptr": "*i32", "occ_ptr": f"*{acc}", "coef_ptr": f"*{acc}", "ct": "i32", "V": "i32",
            "T": "i32", "S_max": "i32", "t0": "i32", "BLOCK_S": "constexpr"}, {"BLOCK_S": 1024}))
        cases.append(_alpha_case(f"ctc_alpha[{acc},given_emissions]", acc, acc, False, gather=False))
        cases.append(_beta_case(f"ctc_beta_grad[{acc},occupancy_out]", acc, True))
    return cases


def _moe_cases() -> List[Case]:
    cases = []
    for normalize in (False, True):
        cases.append(Case(f"moe_route[top_k=2,normalize={normalize}]", moe._route_kernel, {
            "logits_ptr": "*fp32", "probs_ptr": "*fp32", "weights_ptr": "*fp32", "experts_ptr": "*i64",
            "lse_ptr": "*fp32", "N": "i32", "E": "i32", "TOP_K": "constexpr", "NORMALIZE": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_E": "constexpr"},
            {"TOP_K": 2, "NORMALIZE": normalize, "BLOCK_N": 128, "BLOCK_E": 32}))
    cases.append(Case("moe_sort_slots", moe._sort_slots_kernel, {
        "experts_ptr": "*i64", "counts_ptr": "*i64", "offsets_ptr": "*i64", "order_ptr": "*i64",
        "position_ptr": "*i64", "slots": "i32", "E": "i32", "BLOCK": "constexpr", "BLOCK_E": "constexpr"},
        {"BLOCK": 512, "BLOCK_E": 32}))
    for dtype in ("fp32", "bf16"):
        for weighted in (False, True):
            cases.append(Case(f"moe_unpermute[{dtype},weights={weighted}]", moe._unpermute_kernel, {
                "y_ptr": f"*{dtype}", "position_ptr": "*i64", "weights_ptr": "*fp32", "out_ptr": f"*{dtype}",
                "O": "i32", "TOP_K": "constexpr", "HAS_WEIGHTS": "constexpr", "BLOCK_O": "constexpr"},
                {"TOP_K": 2, "HAS_WEIGHTS": weighted, "BLOCK_O": 1024}))
        cases.append(Case(f"moe_unpermute_backward[{dtype}]", moe._unpermute_backward_kernel, {
            "grad_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "position_ptr": "*i64", "weights_ptr": "*fp32",
            "grad_y_ptr": f"*{dtype}", "grad_w_ptr": "*fp32", "O": "i32", "TOP_K": "constexpr",
            "HAS_WEIGHTS": "constexpr", "WEIGHT_GRAD": "constexpr", "BLOCK_O": "constexpr"},
            {"TOP_K": 2, "HAS_WEIGHTS": True, "WEIGHT_GRAD": True, "BLOCK_O": 1024}))
        precision = "tf32" if dtype == "fp32" else "ieee"
        cases.append(Case(f"moe_grouped_mm[{dtype},{precision}]", moe._grouped_mm_kernel, {
            "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "tile_expert_ptr": "*i64", "tile_row_ptr": "*i64", "offsets_ptr": "*i64", "N": "i32", "K": "i32",
            "stride_we": "i32",
            "stride_wn": "i32", "stride_wk": "i32", "HAS_BIAS": "constexpr", "PRECISION": "constexpr",
            "DOT_F32": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"HAS_BIAS": True, "PRECISION": precision, "DOT_F32": False, "BLOCK_M": 64, "BLOCK_N": 64,
             "BLOCK_K": 32}))
        cases.append(Case(f"moe_grouped_weight_grad[{dtype},{precision}]", moe._grouped_weight_grad_kernel, {
            "g_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "grad_w_ptr": f"*{dtype}", "grad_b_ptr": f"*{dtype}",
            "offsets_ptr": "*i64", "N": "i32", "K": "i32", "BIAS_GRAD": "constexpr", "PRECISION": "constexpr",
            "DOT_F32": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"BIAS_GRAD": True, "PRECISION": precision, "DOT_F32": False, "BLOCK_M": 32, "BLOCK_N": 64,
             "BLOCK_K": 64}))
    return cases


def _fsq_cases() -> List[Case]:
    cases = []
    for dtype in ("fp32", "bf16"):
        cases.append(Case(f"fsq_forward[{dtype}]", fsq._fsq_forward_kernel, {
            "z_ptr": f"*{dtype}", "half_level_ptr": "*fp32", "offset_ptr": "*fp32", "shift_ptr": "*fp32",
            "half_width_ptr": "*fp32", "basis_ptr": "*i64", "codes_ptr": f"*{dtype}", "indices_ptr": "*i64",
            "N": "i32", "D": "i32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}, {"BLOCK_N": 256, "BLOCK_D": 16}))
        cases.append(Case(f"fsq_backward[{dtype}]", fsq._fsq_backward_kernel, {
            "grad_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "half_level_ptr": "*fp32", "shift_ptr": "*fp32",
            "half_width_ptr": "*fp32", "grad_z_ptr": f"*{dtype}", "N": "i32", "D": "i32", "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr"}, {"BLOCK_N": 256, "BLOCK_D": 16}))
    return cases


def all_cases() -> List[Case]:
    return _ctc_cases() + _linear_ctc_cases() + _moe_cases() + _fsq_cases()


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", handle.name],
                             capture_output=True, text=True, check=True).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("spill_bytes", "LOCAL"), ("shared", "SHARED")):
        found = re.search(rf"\b{field}:(\d+)", out)
        usage[key] = int(found.group(1)) if found else -1
    return usage


def compile_case(case: Case, arch: int) -> Dict[str, object]:
    fn = case.kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1); compile them in a process without it")
    source = ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
    return {"kernel": case.name, "arch": f"sm_{arch}", **_resource_usage(compiled.asm["cubin"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args(argv)
    failures = 0
    print(f"{'kernel':52s} {'arch':6s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>6s}")
    for case in all_cases():
        for arch in args.arch:
            try:
                r = compile_case(case, arch)
            except Exception as error:  # report every failure, then fail
                failures += 1
                print(f"{case.name:52s} sm_{arch:<3d} FAILED: {type(error).__name__}: {error}")
                continue
            print(f"{r['kernel']:52s} {r['arch']:6s} {r['registers']:5d} {r['spill_bytes']:6d} {r['stack']:6d} {r['shared']:6d}")
    print(f"compiled {len(all_cases()) * len(args.arch) - failures} kernels, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
