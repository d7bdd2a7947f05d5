"""Compile Triton kernels ahead of time for real GPUs (no GPU needed) and report the registers,
spills and shared memory of each.

What is compiled is what runs: every launch goes through ``omnifast.kernels._launch.launch``,
which can record its specialisation (kernel, argument dtypes, constexprs, warps). The test suite
records every launch it makes under the interpreter and compiles exactly that set for sm_80 and
sm_90 (``tests/kernels/test_aot.py``); a ``*_kernel`` that no test launched is reported as a
test gap. By hand: ``python -m omnifast.kernels.aot --specs launches.json``.

Run without ``TRITON_INTERPRET=1``: the interpreter replaces ``@triton.jit`` functions with
Python ones that cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Set

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNEL_MODULES = ("omnifast.kernels.ctc", "omnifast.kernels.linear_ctc", "omnifast.kernels.moe", "omnifast.kernels.fsq")


def kernel_names() -> Set[str]:
    """``module.name`` of every launchable kernel (by convention a ``@triton.jit`` function whose
    name ends in ``_kernel``; helpers called from kernels have other names)."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if name.endswith("_kernel") and fn is not None and fn.__module__ == module_name:
                names.add(f"{module_name}.{name}")
    return names


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", handle.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("stack", "STACK"), ("spill_bytes", "LOCAL"), ("shared", "SHARED")):
        found = re.search(rf"\b{field}:(\d+)", out)
        usage[key] = int(found.group(1)) if found else -1
    return usage


def describe(spec: dict) -> str:
    pointers = ",".join(t[1:] for t in spec["signature"].values() if t.startswith("*"))
    constexprs = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    stages = f"s{spec['num_stages']}" if "num_stages" in spec else ""
    return f"{spec['kernel']}[{pointers}|{constexprs}|w{spec['num_warps']}{stages}]"


def compile_spec(spec: dict, arch: int) -> Dict[str, object]:
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1); compile them in a process without it")
    source = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
    options = {"num_warps": spec["num_warps"]}
    if "num_stages" in spec:
        options["num_stages"] = spec["num_stages"]
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return {"kernel": describe(spec), "arch": f"sm_{arch}", **_resource_usage(compiled.asm["cubin"])}


def _compile_or_error(job):
    spec, arch = job
    try:
        return compile_spec(spec, arch), None
    except Exception as error:  # reported by the caller, every failure at once
        return None, f"{describe(spec):100s} sm_{arch:<3d} FAILED: {type(error).__name__}: {error}"


def compile_all(specs: List[dict], archs: List[int], workers: int = 0) -> int:
    """Compile every spec for every arch (in ``workers`` processes; 0: one per CPU), print one
    row each; the number of failures."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(spec, arch) for spec in sorted(specs, key=describe) for arch in archs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(_compile_or_error, jobs, chunksize=4))
    print(
        f"{'kernel [pointer dtypes | constexprs | warps]':100s} {'arch':6s} {'regs':>5s} {'spill':>6s} "
        f"{'stack':>6s} {'smem':>6s}"
    )
    failures = 0
    for r, error in results:
        if error is not None:
            failures += 1
            print(error)
            continue
        print(
            f"{r['kernel']:100s} {r['arch']:6s} {r['registers']:5d} {r['spill_bytes']:6d} {r['stack']:6d} "
            f"{r['shared']:6d}"
        )
    print(f"compiled {len(jobs) - failures} kernels, {failures} failed")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", required=True, help="JSON list of recorded launch specialisations")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument(
        "--require-all", action="store_true", help="also fail when a *_kernel was never launched (a test gap)"
    )
    args = parser.parse_args(argv)
    with open(args.specs) as handle:
        specs = json.load(handle)
    failures = compile_all(specs, args.arch)
    launched = {f"{s['module']}.{s['kernel']}" for s in specs}
    gaps = sorted(kernel_names() - launched)
    for name in gaps:
        print(f"never launched by the tests: {name}")
    return 1 if failures or (args.require_all and gaps) else 0


if __name__ == "__main__":
    sys.exit(main())
