"""What DDP's search for unused parameters costs: the optimizer step of two gloo processes (CPU)
training the speech decoder (stage 4) of the ``small`` model, with ``find_unused_parameters`` on
(what every run paid before) and off (what a run pays now unless a trained media encoder has
records without its media). Median step time of each, and the ratio.
Run ``python -m benchmarks.ddp_step`` (``--quick``: the tiny model, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import RESULTS, environment, write_json


def _worker(config: str, find_unused: bool, steps: int, scratch: Path) -> None:
    """One rank: build the model and records, time ``steps`` optimizer steps after one warm-up."""
    import torch

    from omnifast.models import OmniProcessor, build_tiny_tokenizer
    from omnifast.training import TrainConfig, Trainer, distributed, get_stage, load_records

    from .train_step import build_model, config_named, step_batches, write_records

    torch.set_num_threads(1)
    distributed.may_leave_unused = lambda trains, records: find_unused  # the setting under test, forced
    model_config = config_named(config)
    model = build_model(model_config, torch.device("cpu"), torch.float32)
    processor = OmniProcessor(build_tiny_tokenizer(), model_config)
    data = scratch / f"{config}.json"
    if not data.is_file():
        write_records(data, 16, 24, 20, 60, model_config.decoder_config().units)
    records = load_records(data, get_stage("speech-gen"), model_config.decoder_config().units)
    trainer = Trainer(
        model,
        processor,
        records,
        TrainConfig(
            stage="speech-gen", batch_size=2, max_steps=steps + 1, epochs=100, progress=False, save_every=10**6
        ),
        scratch / f"out-{find_unused}",
        device="cpu",
    )
    trainer.train_step(step_batches(trainer, 0))
    times = []
    for i in range(steps):
        batches = step_batches(trainer, i + 1)
        start = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
    if trainer.rank == 0:
        (scratch / f"times-{find_unused}.json").write_text(json.dumps(times))


def run(config: str, steps: int) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for find_unused in (True, False):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(29700 + find_unused),
                "-m",
                "benchmarks.ddp_step",
                "--worker",
                config,
                str(int(find_unused)),
                str(steps),
                scratch,
            ]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            times = json.loads((Path(scratch) / f"times-{find_unused}.json").read_text())
            rows["find_unused_parameters=True" if find_unused else "find_unused_parameters=False"] = {
                "median_step_s": statistics.median(times),
                "steps": len(times),
            }
    on, off = rows["find_unused_parameters=True"], rows["find_unused_parameters=False"]
    return {
        "op": "ddp_step",
        "description": __doc__,
        "environment": environment(__import__("torch").device("cpu")),
        "config": config,
        "processes": 2,
        "rows": rows,
        "speedup": on["median_step_s"] / off["median_step_s"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 2)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config, find_unused, steps, scratch = args.worker
        _worker(config, bool(int(find_unused)), int(steps), Path(scratch))
        return 0
    payload = run("tiny" if args.quick else "small", args.steps or (2 if args.quick else 10))
    for name, row in payload["rows"].items():
        print(f"{name:32s} median step {row['median_step_s']:.4f} s")
    print(f"without the search: {payload['speedup']:.2f}x the step rate ({payload['config']}, 2 gloo processes)")
    path = write_json(Path(args.out) / ("quick_ddp_step.json" if args.quick else "ddp_step.json"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
