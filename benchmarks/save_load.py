"""Saving and loading a whole model: one unsharded file loaded into a model built (and randomly
initialised) first, against ``save_pretrained``'s shards (transformers' layout) loaded shard by
shard into a model built on the meta device. The model: OpenOmni's 595M speech decoder behind the
tiny components (596M parameters, float32). Each save and each load runs in a fresh subprocess
whose peak RSS above its start (``VmHWM``) is read, so a figure is what that process held; the
model a save writes is built before the measurement starts; a load is timed and measured until
every weight has been read once (safetensors maps the file, so untouched weights cost nothing
yet). The 9.24B-parameter OpenOmni model
is stated by arithmetic from the measured ratio of peak memory to weight bytes.
Run ``python -m benchmarks.save_load``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ._harness import RESULTS, environment, write_json

OPENOMNI_PARAMETERS = 9.238e9  # OmniConfig.openomni_7b(), counted on the meta device

CHILD = """
import json, sys, time
from dataclasses import asdict
import torch
from omnifast.models import OmniConfig, OmniModel
from omnifast.nn.speech_decoder import SpeechDecoderConfig
from safetensors.torch import load_model, save_model

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

action, layout, folder, size = sys.argv[1:5]
config = OmniConfig.tiny()
if size == "full":
    config.speech_decoder = asdict(SpeechDecoderConfig.openomni(llm_hidden=128))
if action == "save":
    torch.manual_seed(0)
    model = OmniModel(config)
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
start = time.perf_counter()
if action == "save" and layout == "one file":
    save_model(model, folder + "/model.safetensors")
    config.save(folder + "/omnifast_config.json")
elif action == "save":
    model.save_pretrained(folder, max_shard_size=layout.split()[-1])
elif layout == "one file":
    model = OmniModel(OmniConfig.load(folder + "/omnifast_config.json"))
    load_model(model, folder + "/model.safetensors")
else:
    model = OmniModel.from_pretrained(folder)
if action == "load":  # safetensors maps the file: read every weight once, so it is really held
    for tensor in model.state_dict().values():
        tensor.sum()
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"seconds": seconds, "peak_bytes": (kib("VmHWM") - before) * 1024, "weight_bytes": weights,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""

LAYOUTS = ("one file", "shards of 5GB", "shards of 1GB")


def measure(action: str, layout: str, folder: Path, size: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, action, layout, str(folder), size],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="the tiny model (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows, size = [], "quick" if args.quick else "full"
    layouts = LAYOUTS if size == "full" else ("one file", "shards of 1MB")
    with tempfile.TemporaryDirectory() as scratch:
        for layout in layouts:
            folder = Path(scratch) / layout.replace(" ", "-")
            folder.mkdir()
            saved = measure("save", layout, folder, size)
            loaded = measure("load", layout, folder, size)
            files = sorted(p.name for p in folder.glob("model*.safetensors"))
            rows.append(
                {
                    "layout": layout,
                    "how": "built and initialised, then filled"
                    if layout == "one file"
                    else "built on meta, filled shard by shard",
                    "files": len(files),
                    "save_s": saved["seconds"],
                    "save_peak_bytes": saved["peak_bytes"],
                    "load_s": loaded["seconds"],
                    "load_peak_bytes": loaded["peak_bytes"],
                    "weight_bytes": loaded["weight_bytes"],
                    "parameters": loaded["parameters"],
                }
            )
    weights = rows[0]["weight_bytes"]
    print(
        f"\nsave and load, {rows[0]['parameters'] / 1e6:.0f}M parameters ({weights / 2**20:.0f} MiB float32), "
        f"fresh process each, CPU"
    )
    print(
        f"{'layout':14s} {'files':>5s} {'save s':>7s} {'save peak MiB':>14s} {'load s':>7s} {'load peak MiB':>14s} "
        f"{'load peak / weights':>20s}"
    )
    for r in rows:
        print(
            f"{r['layout']:14s} {r['files']:5d} {r['save_s']:7.2f} {r['save_peak_bytes'] / 2**20:14.0f} "
            f"{r['load_s']:7.2f} {r['load_peak_bytes'] / 2**20:14.0f} {r['load_peak_bytes'] / weights:19.2f}x"
        )
    per_parameter = weights / rows[0]["parameters"]
    arithmetic = {}
    for r in rows:
        ratio = r["load_peak_bytes"] / r["weight_bytes"]
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            arithmetic[f"{r['layout']}, {dtype}"] = {
                "weight_gb": OPENOMNI_PARAMETERS * size / 1e9,
                "load_peak_gb": OPENOMNI_PARAMETERS * size * ratio / 1e9,
            }
    print(
        f"\narithmetic for OpenOmni ({OPENOMNI_PARAMETERS / 1e9:.2f}B parameters), by the measured "
        f"load peak / weights ratio ({per_parameter:.0f} bytes per parameter measured):"
    )
    for name, values in arithmetic.items():
        print(f"  {name:26s} weights {values['weight_gb']:5.1f} GB, load peak {values['load_peak_gb']:5.1f} GB")
    path = write_json(
        Path(args.out) / f"{'quick_' if args.quick else ''}save_load.json",
        {
            "op": "save_load",
            "description": __doc__,
            "rows": rows,
            "openomni_arithmetic": arithmetic,
            "environment": environment(__import__("torch").device("cpu")),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
