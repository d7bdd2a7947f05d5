"""What LoRA saves against full fine-tuning of the LLM: the ``small`` model's text stage
(``llm-pretrain``, the LLM trains) with its weights trained, and with rank-16 LoRA adapters in
every attention and MLP projection instead. Per setting: the trained parameters, the memory of a
step (peak RSS growth over the first optimizer step of a fresh process: activations, gradients,
AdamW's moments) and the step time. CPU figures; the ratios carry to a GPU, where the optimizer's
two moments of every trained weight are what LoRA takes away.
Run ``python -m benchmarks.lora`` (``--quick``: the tiny model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import RESULTS, environment, write_json

SETTINGS = {"full fine-tuning": [], "LoRA r=16": ["--lora-r", "16"]}


def _trainer(config_name: str, lora: bool, scratch: Path):
    import torch

    from omnifast.models import OmniProcessor, build_tiny_tokenizer
    from omnifast.training import TrainConfig, Trainer, get_stage, load_records

    from .train_step import build_model, config_named, write_records

    config = config_named(config_name)
    model = build_model(config, torch.device("cpu"), torch.float32)
    data = scratch / "text.json"
    if not data.is_file():
        write_records(data, 8, 64, 60, 4, 4)
    records = load_records(data, get_stage("llm-pretrain"))
    options = TrainConfig(
        stage="llm-pretrain", batch_size=2, max_steps=4, progress=False, save_every=10**6, lora_r=16 if lora else None
    )
    return Trainer(
        model, OmniProcessor(build_tiny_tokenizer(), config), records, options, scratch / "out", device="cpu"
    )


def _measure(config_name: str, lora: bool, scratch: Path) -> dict:
    """In this (fresh) process: trained parameters, the first step's working set, step times."""
    from ._harness import peak_memory_here
    from .train_step import step_batches

    trainer = _trainer(config_name, lora, scratch)
    trained = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    batches = step_batches(trainer, 0)
    working = peak_memory_here(lambda: trainer.train_step(batches), __import__("torch").device("cpu"))
    times = []
    for i in range(1, 4):
        batches = step_batches(trainer, i)
        start = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
    return {"trained_parameters": trained, "step_working_bytes": working, "step_s": statistics.median(times)}


def run(config_name: str) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in SETTINGS.items():
            command = [
                sys.executable,
                "-m",
                "benchmarks.lora",
                "--measure",
                config_name,
                str(int(bool(extra))),
                scratch,
            ]
            out = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
            ).stdout
            rows[name] = json.loads(out.strip().splitlines()[-1])
    full, lora = rows["full fine-tuning"], rows["LoRA r=16"]
    return {
        "op": "lora",
        "description": __doc__,
        "environment": environment(__import__("torch").device("cpu")),
        "config": config_name,
        "rows": rows,
        "memory_ratio": lora["step_working_bytes"] / max(full["step_working_bytes"], 1),
        "trained_ratio": lora["trained_parameters"] / full["trained_parameters"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model: a smoke run")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        config_name, lora, scratch = args.measure
        print(json.dumps(_measure(config_name, bool(int(lora)), Path(scratch))))
        return 0
    payload = run("tiny" if args.quick else "small")
    for name, row in payload["rows"].items():
        print(
            f"{name:18s} trained {row['trained_parameters']:>12,d}  step working set "
            f"{row['step_working_bytes'] / 2**20:8.1f} MiB  step {row['step_s']:.3f} s"
        )
    print(
        f"LoRA: {payload['memory_ratio']:.2f}x the step memory, {payload['trained_ratio']:.4f}x the trained "
        f"parameters ({payload['config']})"
    )
    path = write_json(Path(args.out) / ("quick_lora.json" if args.quick else "lora.json"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
