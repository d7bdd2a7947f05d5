"""Does the loader keep the device fed? Records per second of the training loader
(``omnifast.training.loader``: decoding, resampling, Whisper features, CLIP preprocessing,
tokenising, collating), and the share of a training step spent waiting for data, with 0 worker
processes against 2 and 4.

The records are OpenOmni-sized: a 5-second spoken question (44.1 kHz stereo FLAC, resampled to
16 kHz mono, 128-bin log-mel of the 30-second Whisper window) and a 640x480 JPEG picture (CLIP's
336-pixel crop), with a text answer. The step is a GPU-bound step as the host sees it: the
training thread waits ``--step-ms`` (default 250, a 7B stage step of a few records) while the
workers run; with 0 workers the batch is built on that thread between steps.
Run ``python -m benchmarks.loader`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._harness import RESULTS, environment, write_json


def write_records(root: Path, count: int) -> Path:
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        t = np.arange(44100 * 5) / 44100
        wave = 0.1 * np.sin(2 * np.pi * (200 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size)
        soundfile.write(root / f"q{i}.flac", np.stack([wave, wave * 0.9], 1).astype(np.float32), 44100)
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / f"p{i}.jpg", quality=90)
        rows.append(
            {
                "id": f"r{i}",
                "image": f"p{i}.jpg",
                "speech": f"q{i}.flac",
                "conversations": [
                    {"from": "human", "value": "<image>\n<speech>"},
                    {"from": "gpt", "value": "There are two red circles on the left of the picture."},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def processor():
    from omnifast.models import OmniConfig, OmniProcessor, build_tiny_tokenizer

    config = OmniConfig.openomni_7b()  # its media sizes, with the byte tokenizer's placeholder ids
    config.image_token_id, config.speech_token_id = 259, 260
    return OmniProcessor(build_tiny_tokenizer(), config)


def run(path: Path, workers: int, batch: int, steps: int, step_s: float) -> dict:
    import torch

    from omnifast.training import get_stage, load_records
    from omnifast.training.loader import ConversationDataset, MicroBatches, make_loader

    records = load_records(path, get_stage("i2t-sft"), audio_seconds=30, sampling_rate=16000)
    dataset = ConversationDataset(records, processor())
    loader = make_loader(
        dataset, MicroBatches(len(dataset), batch, seed=0, stop=steps + 1), workers, torch.device("cpu")
    )
    batches = iter(loader)
    next(batches)  # workers started and the first batch built: the steady state is measured
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        next(batches)
        waited += time.perf_counter() - before
        time.sleep(step_s)  # the device's step; the host thread waits for it
    total = time.perf_counter() - start
    del batches, loader
    return {
        "workers": workers,
        "steps": steps,
        "batch": batch,
        "step_s": step_s,
        "seconds": total,
        "records_per_s": steps * batch / total,
        "wait_share": waited / total,
        "wait_s_per_step": waited / steps,
    }


def loader_rate(path: Path, workers: int, batch: int, steps: int) -> float:
    """Records per second of the loader alone (no step between batches)."""
    return run(path, workers, batch, steps, 0.0)["records_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few records and steps")
    parser.add_argument("--step-ms", type=float, default=250.0, help="the emulated device step (default 250 ms)")
    parser.add_argument("--batch", type=int, default=4, help="records per micro-batch (default 4)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps, count = (3, 8) if args.quick else (20, 32)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = write_records(Path(scratch), count)
        for workers in (0, 2) if args.quick else (0, 2, 4):
            row = run(path, workers, args.batch, steps, args.step_ms / 1000)
            row["loader_only_records_per_s"] = loader_rate(path, workers, args.batch, steps)
            rows.append(row)
            print(f"done: workers {workers}", file=sys.stderr)
    print(
        f"\nloader: batches of {args.batch} records (5 s 44.1 kHz stereo FLAC + 640x480 JPEG each), "
        f"{args.step_ms:.0f} ms device step"
    )
    print(f"{'workers':>7s} {'loader records/s':>17s} {'training records/s':>19s} {'waiting':>8s} {'wait/step':>10s}")
    for r in rows:
        print(
            f"{r['workers']:7d} {r['loader_only_records_per_s']:17.1f} {r['records_per_s']:19.1f} "
            f"{r['wait_share']:7.1%} {r['wait_s_per_step'] * 1e3:8.1f} ms"
        )
    import torch

    path = write_json(
        Path(args.out) / f"{'quick_' if args.quick else ''}loader.json",
        {"op": "loader", "description": __doc__, "rows": rows, "environment": environment(torch.device("cpu"))},
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
