"""The ``omnifast`` command: ``omnifast init``, ``train``, ``cache``, ``eval``, ``chat``, ``serve``, ``bench``,
``tokenizer`` and ``demo``.

``main(argv)`` raises (for use from Python); the console command (``console``) prints a user's
error (bad data, a bad checkpoint or cache, a bad option, a missing file) as one message and
exits 2, with the traceback only under ``omnifast --debug ...``."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = (
    "ctc",
    "linear_ctc",
    "ctc_dpo",
    "ar_dpo",
    "moe",
    "speech_decoder",
    "openomni_patch",
    "train_step",
    "length_spread",
    "loader",
    "data_scale",
    "save_load",
    "ddp_step",
    "lora",
)
CHECKS = ("gpu-check", "demo_time")  # not part of `bench all`


def main(argv=None) -> int:
    try:
        return _run(argv)
    finally:
        from omnifast.training import distributed

        distributed.shutdown()


def _run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="omnifast", description="omnifast: kernels for omni-modal LLM training")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark an op family against the reference ops")
    bench.add_argument("op", choices=BENCHMARKS + CHECKS + ("all",))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark script")
    demo = commands.add_parser(
        "demo",
        help="the main job: a tiny omni model trained through the five stages on a "
        "synthetic corpus, evaluated, with a report in --out",
    )
    demo.add_argument("--quick", action="store_true", help="a smoke test of the whole run (under 3 minutes)")
    demo.add_argument("--out", default="demo_out", help="where the report goes (default: demo_out)")
    demo.add_argument("--cache", default=".cache", help="where the corpus is built once (default: .cache)")
    demo.add_argument("--seed", type=int, default=0, help="(default: 0)")
    demo.add_argument("--no-progress", action="store_true")
    from omnifast.training import run

    train = commands.add_parser("train", help="run a training stage (or all five)")
    run.add_train_arguments(train)
    cache = commands.add_parser(
        "cache",
        help="run the frozen front once over a speech stage's data and keep "
        "the states its speech decoder reads (and the reference's log-likelihoods)",
    )
    run.add_cache_arguments(cache)
    evaluate = commands.add_parser("eval", help="evaluate a stage's model on held-out records")
    run.add_eval_arguments(evaluate)
    from omnifast import chat

    talk = commands.add_parser(
        "chat", help="ask a trained model a written or spoken question; its answer printed and spoken into a WAV file"
    )
    chat.add_arguments(talk)
    from omnifast import serve

    page = commands.add_parser(
        "serve", help="a web page to talk to a trained model (needs Gradio: pip install 'omnifast[serve]')"
    )
    serve.add_arguments(page)
    from omnifast.models import components

    init = commands.add_parser(
        "init", help="an omni model from your own LLM, vision and Whisper folders, saved for omnifast train --model"
    )
    components.add_init_arguments(init)
    from omnifast.speech import train as tokenizer_training

    tokenizer = commands.add_parser("tokenizer", help="train a speech tokenizer and unit vocoder")
    tokenizer_training.add_arguments(tokenizer)
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        return tokenizer_training.train_command(args)
    if args.command == "train":
        return run.train_command(args)
    if args.command == "init":
        return components.init_command(args)
    if args.command == "eval":
        return run.eval_command(args)
    if args.command == "cache":
        return run.cache_command(args)
    if args.command == "chat":
        return chat.chat_command(args)
    if args.command == "serve":
        return serve.serve_command(args)
    if args.command == "demo":
        from omnifast.demo import espeak_available
        from omnifast.demo.run import run_demo

        if not espeak_available():
            print(
                "omnifast demo needs eSpeak NG for its speech: `pip install espeakng-loader` (a wheel that bundles "
                "it; `make demo` installs it) or the espeak-ng system package (libespeak-ng).",
                file=sys.stderr,
            )
            return 1
        results = run_demo(args.out, args.cache, args.quick, args.seed, not args.no_progress)
        print(f"report: {args.out}/report.md ({results['seconds']['total']:.0f} s)")
        return 0
    ops = BENCHMARKS if args.op == "all" else (args.op,)
    if args.op == "all" and "--quick" not in args.rest and "cuda" not in " ".join(args.rest):
        import torch

        if not torch.cuda.is_available():  # the 7B training step needs a GPU: the rest still runs here
            print(
                "bench all: skipping train_step (it needs a GPU; `omnifast bench train_step --quick` runs it "
                "at tiny size on the CPU)",
                file=sys.stderr,
            )
            ops = tuple(op for op in ops if op != "train_step")
    benchmarks_checkout()
    for op in ops:
        status = importlib.import_module(f"benchmarks.{op.replace('-', '_')}").main(args.rest)
        if status:
            return status
    return 0


def benchmarks_checkout():
    """The checkout whose ``benchmarks/`` folder ``omnifast bench`` runs (put on ``sys.path``):
    the benchmark scripts live beside the package in the repository, not in the installed wheel."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "_harness.py").is_file():
        raise FileNotFoundError(
            "omnifast bench runs the benchmark scripts of a checkout of the repository "
            f"(benchmarks/ beside omnifast/); {root} has none: clone the repository and run "
            "omnifast bench (or python -m benchmarks.<op>) there"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def user_errors():
    """The exceptions that mean a user's input is wrong rather than omnifast."""
    from omnifast.audio import AudioError
    from omnifast.training import CheckpointError, DataError
    from omnifast.training.cache import CacheError

    return (
        DataError,
        CheckpointError,
        CacheError,
        AudioError,
        ValueError,
        TypeError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    )


def console(argv=None) -> int:
    """The ``omnifast`` console command: :func:`main`, a user's error printed as one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from omnifast.training.signals import TrainingStopped
    from omnifast.training.step import TrainingDiverged

    try:
        return main(argv)
    except TrainingStopped as stop:
        print(f"omnifast: {stop}", file=sys.stderr)
        return stop.exit_code
    except TrainingDiverged as error:
        print(f"omnifast: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("omnifast: interrupted", file=sys.stderr)
        return 130
    except user_errors() as error:
        if "--debug" in argv:
            raise
        print(f"omnifast: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != 28 or "--debug" in argv:  # only a full disk is the user's to fix here
            raise
        print(f"omnifast: error: {error.strerror if hasattr(error, 'path') else error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(console())
