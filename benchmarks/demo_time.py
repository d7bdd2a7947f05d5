"""How long ``omnifast demo --quick`` takes once set up (corpus cached, as a second run finds it),
against its 3-minute budget; the full demo with ``--full``. Prints the time of each step and
writes JSON. Run ``python -m benchmarks.demo_time``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ._harness import RESULTS, write_json

BUDGET_S = {"quick": 180, "full": 900}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="time the full demo instead of --quick")
    parser.add_argument("--cache", default=".cache", help="the corpus cache (built first if missing)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # `bench all --quick`
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from omnifast.demo import corpus
    from omnifast.demo.run import run_demo

    size = "full" if args.full else "quick"
    corpus.build_corpus(args.cache, 0, progress=False)  # set up: not part of the timed run
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        results = run_demo(Path(scratch) / "demo_out", args.cache, quick=not args.full, progress=False)
        seconds = time.perf_counter() - start
    payload = {
        "op": "demo_time",
        "size": size,
        "seconds": seconds,
        "budget_s": BUDGET_S[size],
        "within_budget": seconds <= BUDGET_S[size],
        "steps": results["seconds"],
    }
    print(f"omnifast demo{'' if args.full else ' --quick'}: {seconds:.0f} s (budget {BUDGET_S[size]} s)")
    for name, step in results["seconds"].items():
        print(f"  {name}: {step:.1f} s")
    write_json(Path(args.out) / f"demo_time-{size}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
