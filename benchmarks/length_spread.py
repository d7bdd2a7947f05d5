"""Records of realistic, spread-out lengths through the speech decoder's training step: padded
batches against length-bucketed token budgets and packing, eager or compiled, with and without
activation checkpointing.

Response lengths are drawn log-normal (median 60 tokens, sigma ``--sigma``, default 0.65,
clipped to 8-160), the decoder's frames 12x that and the units 10x; each record's frozen states
come from the state cache's layout (random here: the step after the cache is the decoder's
alone). The cases:
* ``padded``: random batches of a fixed number of records, padded to the longest (a step without
  token budgets or packing);
* ``bucketed``: length-bucketed token budgets of the same mean size, still padded;
* ``packed``: the same budgets, packed end to end (no padded frame reaches a decoder layer);
* ``packed + compiled``, ``packed + selective`` and ``packed + full`` checkpointing.
Reported: units/s over the whole epoch, the padding fraction of the decoder's frames, and the
step's working set per frame (peak RSS growth over a step, in a fresh process), from which the
largest token budget that fits ``--memory-gib`` is derived.
Run ``python -m benchmarks.length_spread`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from omnifast.nn import SpeechDecoder, SpeechDecoderConfig, build_speech_decoder
from omnifast.training.block_options import apply_layer_options
from omnifast.training.loader import MicroBatches, TokenBudgetBatches

from ._harness import RESULTS, environment, write_json

CASES = {
    "padded": dict(budget=False, packing=False, compile=False, checkpointing="off"),
    "bucketed": dict(budget=True, packing=False, compile=False, checkpointing="off"),
    "packed": dict(budget=True, packing=True, compile=False, checkpointing="off"),
    "packed + compiled": dict(budget=True, packing=True, compile=True, checkpointing="off"),
    "packed + selective": dict(budget=True, packing=True, compile=False, checkpointing="selective"),
    "packed + full": dict(budget=True, packing=True, compile=False, checkpointing="full"),
}


def decoder_config(quick: bool) -> SpeechDecoderConfig:
    if quick:
        return SpeechDecoderConfig.tiny(upsample_factor=12)
    return SpeechDecoderConfig(
        llm_hidden=1024, width=224, fusion_heads=16, fusion_head_dim=64, heads=14, kv_heads=2, intermediate=1216
    )  # OmniConfig.small()'s decoder


def lengths(records: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(60), sigma, records)), 8, 160).astype(np.int64)


class Records:
    def __init__(self, tokens: np.ndarray, config: SpeechDecoderConfig, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        self.states = [torch.randn(int(n), config.llm_hidden, generator=generator) for n in tokens]
        self.text = [torch.randint(0, config.text_vocab, (int(n),), generator=generator) for n in tokens]
        self.units = [torch.randint(0, config.units, (int(10 * n),), generator=generator) for n in tokens]
        self.frames = config.upsample_factor * tokens

    def batch(self, indices: List[int]):
        n = torch.tensor([int(self.tokens[i]) for i in indices])
        N, U = int(n.max()), max(len(self.units[i]) for i in indices)
        states = torch.zeros(len(indices), N, self.states[0].shape[1])
        text = torch.zeros(len(indices), N, dtype=torch.long)
        units = torch.full((len(indices), U), -100, dtype=torch.long)
        for row, i in enumerate(indices):
            states[row, : n[row]], text[row, : n[row]] = self.states[i], self.text[i]
            units[row, : len(self.units[i])] = self.units[i]
        mask = torch.arange(N)[None] < n[:, None]
        return states, text, mask, units


def plan(records: Records, case: Dict, batch: int) -> List[List[int]]:
    count = len(records.tokens)
    if case["budget"]:
        budget = int(batch * records.frames.mean())
        sampler = TokenBudgetBatches(records.frames, max(budget, int(records.frames.max())), seed=0)
    else:
        sampler = MicroBatches(count, batch, seed=0)
    return [sampler.indices(m) for m in range(sampler.count(0))]


def build(config: SpeechDecoderConfig, case: Dict) -> SpeechDecoder:
    torch.manual_seed(0)
    decoder = build_speech_decoder(config)
    decoder.packing = case["packing"]

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.speech_decoder = decoder

    apply_layer_options(Holder(), ["speech_decoder"], case["checkpointing"], case["compile"])
    return decoder


def step(decoder: SpeechDecoder, optimizer, records: Records, indices: List[int]) -> None:
    states, text, mask, units = records.batch(indices)
    decoder(states, text, mask, mask, units).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def padding_fraction(records: Records, batches: List[List[int]], packed: bool) -> float:
    real = sum(int(records.frames[b].sum()) for b in batches)
    used = real if packed else sum(int(records.frames[b].max()) * len(b) for b in batches)
    return 1 - real / used


def measure(name: str, config: SpeechDecoderConfig, records: Records, batch: int, steps: int) -> Dict:
    case = CASES[name]
    decoder = build(config, case)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    batches = plan(records, case, batch)
    step(decoder, optimizer, records, batches[0])  # warm-up (and the compile)
    step(decoder, optimizer, records, batches[-1])  # another shape
    timed = batches[1 : 1 + steps]
    start = time.perf_counter()
    for indices in timed:
        step(decoder, optimizer, records, indices)
    seconds = time.perf_counter() - start
    units = sum(len(records.units[i]) for b in timed for i in b)
    return {
        "case": name,
        "steps": len(timed),
        "units_per_s": units / seconds,
        "seconds": seconds,
        "records_per_step": float(np.mean([len(b) for b in batches])),
        "frames_per_step": float(np.mean([records.frames[b].sum() for b in batches])),
        "padding_fraction": padding_fraction(records, batches, case["packing"]),
    }


def working_set(name: str, quick: bool, sigma: float, records: int, batch: int) -> Dict:
    """In a fresh process: peak RSS growth over one step of the largest batch, and its frames."""
    from ._harness import peak_memory_here

    config = decoder_config(quick)
    data = Records(lengths(records, sigma), config)
    case = CASES[name]
    decoder = build(config, case)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    batches = plan(data, case, batch)
    step(decoder, optimizer, data, batches[0])  # optimizer state and the compile in place first
    largest = max(
        batches, key=lambda b: int(data.frames[b].max()) * len(b) if not case["packing"] else int(data.frames[b].sum())
    )
    frames = int(data.frames[largest].sum()) if case["packing"] else int(data.frames[largest].max()) * len(largest)
    peak = peak_memory_here(lambda: step(decoder, optimizer, data, largest), torch.device("cpu"))
    return {"peak_bytes": peak, "frames": frames}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny decoder, few records")
    parser.add_argument("--sigma", type=float, default=0.65, help="log-normal spread of the lengths (default 0.65)")
    parser.add_argument("--records", type=int, default=None, help="records (default 96; quick 24)")
    parser.add_argument("--batch", type=int, default=4, help="records per padded batch (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 6; quick 2)")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="memory the largest budget must fit")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the working-set subprocesses")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--working-set-of", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = args.records or (24 if args.quick else 96)
    if args.working_set_of:
        print(json.dumps(working_set(args.working_set_of, args.quick, args.sigma, count, args.batch)))
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown cases {unknown}; the cases are {', '.join(CASES)}")
    config = decoder_config(args.quick)
    data = Records(lengths(count, args.sigma), config)
    rows = []
    for name in names:
        row = measure(name, config, data, args.batch, args.steps or args.repeats or (2 if args.quick else 6))
        if not args.no_memory:
            command = [
                sys.executable,
                "-m",
                "benchmarks.length_spread",
                "--working-set-of",
                name,
                "--sigma",
                str(args.sigma),
                "--records",
                str(count),
                "--batch",
                str(args.batch),
            ]
            command += ["--quick"] if args.quick else []
            env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), **__import__("os").environ}
            measured = json.loads(
                subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                .stdout.strip()
                .splitlines()[-1]
            )
            row["bytes_per_frame"] = measured["peak_bytes"] / measured["frames"]
            row["largest_budget_frames"] = int(args.memory_gib * 2**30 / row["bytes_per_frame"])
        rows.append(row)
        print(f"done: {name}", file=sys.stderr)
    base = next((r for r in rows if r["case"] == "padded"), rows[0])
    for row in rows:
        row["speedup_vs_padded"] = row["units_per_s"] / base["units_per_s"]
        if "largest_budget_frames" in row and "largest_budget_frames" in base:
            row["budget_vs_padded"] = row["largest_budget_frames"] / base["largest_budget_frames"]
    print(
        f"\nlength spread (log-normal median 60 tokens, sigma {args.sigma}), {count} records, "
        f"{'tiny' if args.quick else 'small-config'} decoder, CPU"
    )
    print(
        f"{'case':20s} {'units/s':>9s} {'vs padded':>9s} {'padding':>8s} {'records/step':>12s} "
        f"{'KiB/frame':>9s} {'budget vs padded':>16s}"
    )
    for r in rows:
        per_frame = f"{r['bytes_per_frame'] / 1024:9.1f}" if "bytes_per_frame" in r else f"{'-':>9s}"
        budget = f"{r['budget_vs_padded']:15.2f}x" if "budget_vs_padded" in r else f"{'-':>16s}"
        print(
            f"{r['case']:20s} {r['units_per_s']:9.1f} {r['speedup_vs_padded']:8.2f}x "
            f"{r['padding_fraction']:7.1%} {r['records_per_step']:12.1f} {per_frame} {budget}"
        )
    path = write_json(
        Path(args.out) / f"{'quick_' if args.quick else ''}length_spread.json",
        {
            "op": "length_spread",
            "description": __doc__,
            "sigma": args.sigma,
            "records": count,
            "environment": environment(torch.device("cpu")),
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
