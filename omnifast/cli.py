"""The ``omnifast`` command: ``omnifast train``, ``omnifast eval``, ``omnifast bench``,
``omnifast demo``."""
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
    from omnifast.training import run
    train = commands.add_parser("train", help="run a training stage (or all five)")
    run.add_train_arguments(train)
    evaluate = commands.add_parser("eval", help="evaluate a stage's model on held-out records")
    run.add_eval_arguments(evaluate)
    from omnifast.speech import train as tokenizer_training
    tokenizer = commands.add_parser("tokenizer", help="train a speech tokenizer and unit vocoder")
    tokenizer_training.add_arguments(tokenizer)
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        return tokenizer_training.train_command(args)
    if args.command == "train":
        return run.train_command(args)
    if args.command == "eval":
        return run.eval_command(args)
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
