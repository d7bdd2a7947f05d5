"""How many Triton specialisations gpu-check's parts launch, and how long compiling them takes,
measured without a GPU: ``python -m benchmarks.gpu_check_specialisations``.

* parity: the tests marked ``gpu_check`` run under the interpreter with the sm_90 configurations
  (``OMNIFAST_TRITON_ARCH=90``) and the gpu-check hypothesis profile, every launch recorded;
  the real-shape tests run only on a GPU, and are counted with the headline part.
* headline (and profile, whose cases are two of its own): every omnifast implementation of every
  headline case called once at its real shape on CPU tensors through the Triton backend, each
  launch recorded and not executed (``_launch.record_launches(execute=...)``), but for the MoE's
  routing kernels, whose output decides what launches next (they run, interpreted).
* train_step is not counted here (the 7B model does not fit this machine); on a GPU, gpu-check's
  own ``train_step.json`` records what it launched.

Each distinct specialisation is then compiled for sm_90 (``omnifast.kernels.aot``), one process
per worker, and timed: the first launch of a specialisation on a GPU pays about this compilation
(Triton's JIT runs the same compiler; integer arguments divisible by 16 can add variants, so
these counts are a floor). Writes ``docs/results/gpu_check_specialisations.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from ._harness import RESULTS, write_json

SPECS_VARIABLE = "OMNIFAST_GPU_CHECK_SPECS"


def parity_specs(scratch: Path) -> List[dict]:
    from .gpu_check_plugin import PARITY_VARIABLE

    specs = scratch / "parity-specs.json"
    env = {
        **os.environ,
        "OMNIFAST_TEST_DEVICE": "cpu",
        "OMNIFAST_TRITON_ARCH": "90",
        "HYPOTHESIS_PROFILE": "gpu-check",
        PARITY_VARIABLE: str(scratch / "parity.json"),
        SPECS_VARIABLE: str(specs),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.gpu_check_plugin",
        "-m",
        "gpu_check",
        "-k",
        "not cpu",
        "tests",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    print(run.stdout[-1500:])
    return json.loads(specs.read_text())


def headline_specs() -> Dict[str, List[dict]]:
    """{case: the specialisations its omnifast implementations launch} (run in a child process
    with the interpreter and the Triton backend forced)."""
    code = (
        "import json, sys, torch\n"
        "from benchmarks import gpu_check\n"
        "from omnifast.kernels import _launch\n"
        "ROUTING = ('_route_kernel', '_slot_histogram_kernel', '_slot_rank_kernel')\n"
        "out, errors = {}, {}\n"
        "for case in gpu_check.HEADLINE_CASES:\n"
        "    _launch.record_launches(execute=lambda name: name in ROUTING)\n"
        "    for name, fn in gpu_check.implementations(case, torch.device('cpu'), False).items():\n"
        "        if name.startswith('omnifast'):\n"
        "            try:\n"
        "                fn()\n"
        "            except Exception as error:\n"
        "                errors[f'{case.name(False)}: {name}'] = repr(error)[:300]\n"
        "    out[case.name(False)] = _launch.recorded()\n"
        "json.dump({'specs': out, 'errors': errors}, sys.stdout)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMNIFAST_BACKEND": "triton", "OMNIFAST_TRITON_ARCH": "90"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"counting the headline launches failed:\n{run.stderr[-3000:]}")
    found = json.loads(run.stdout)
    for what, error in found["errors"].items():  # a launch that runs past an unwritten output
        print(f"  not counted past the error in {what}: {error}")
    return found["specs"]


def _compile_seconds(spec: dict) -> float:
    from omnifast.kernels.aot import compile_spec

    start = time.perf_counter()
    compile_spec(spec, 90)
    return time.perf_counter() - start


def compile_times(specs: List[dict], workers: int) -> Dict[str, float]:
    from concurrent.futures import ProcessPoolExecutor

    env = os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="omnifast-triton-")  # nothing cached
    try:
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            seconds = list(pool.map(_compile_seconds, specs))
        wall = time.perf_counter() - start
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
    return {
        "specialisations": len(specs),
        "workers": workers,
        "wall_s": wall,
        "sum_s": sum(seconds),
        "mean_s": sum(seconds) / max(len(seconds), 1),
        "max_s": max(seconds, default=0.0),
    }


def _unique(specs: List[dict]) -> List[dict]:
    return list({json.dumps(s, sort_keys=True): s for s in specs}.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        parity = _unique(parity_specs(Path(scratch)))
    headline = headline_specs()
    every_headline = _unique([s for specs in headline.values() for s in specs])
    payload = {
        "description": __doc__,
        "parity": {"specialisations": len(parity)},
        "headline": {
            "specialisations": len(every_headline),
            "per_case": {case: len(_unique(specs)) for case, specs in headline.items()},
        },
    }
    payload["parity"]["compile_sm90"] = compile_times(parity, args.workers)
    payload["headline"]["compile_sm90"] = compile_times(every_headline, args.workers)
    shared = {json.dumps(s, sort_keys=True) for s in parity} & {json.dumps(s, sort_keys=True) for s in every_headline}
    payload["shared_by_parity_and_headline"] = len(shared)
    for part in ("parity", "headline"):
        c = payload[part]["compile_sm90"]
        print(
            f"{part:9s} {c['specialisations']:4d} specialisations: compiled for sm_90 in {c['wall_s']:.1f} s on "
            f"{c['workers']} processes ({c['mean_s']:.2f} s each on average, {c['max_s']:.2f} s the longest; "
            f"{c['sum_s']:.0f} s one after another)"
        )
    for case, count in payload["headline"]["per_case"].items():
        print(f"  {case}: {count}")
    path = write_json(Path(args.out) / "gpu_check_specialisations.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
