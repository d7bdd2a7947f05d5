"""The ``omnifast`` command: ``omnifast bench ctc``, ``omnifast demo``."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("ctc", "linear_ctc", "ctc_dpo", "moe", "speech_decoder")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="omnifast", description="omnifast: kernels for omni-modal LLM training")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark an op family against the reference ops")
    bench.add_argument("op", choices=BENCHMARKS + ("all",))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark script")
    commands.add_parser("demo", help="the main job (for now: the CTC benchmark)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return importlib.import_module("omnifast.benchmarks.ctc").main([])
    ops = BENCHMARKS if args.op == "all" else (args.op,)
    for op in ops:
        status = importlib.import_module(f"omnifast.benchmarks.{op}").main(args.rest)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
