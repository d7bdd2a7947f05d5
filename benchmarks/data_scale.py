"""Data at OpenOmni's scale: a data set of a million records (a JSON list, and JSON Lines) loaded
and validated by ``load_records``, timed, with the peak memory of the process that does it.

Each record is a speech-generation record like OpenOmni's (a question, an answer of 20-60 words,
its units): about 1.3 kB, 1.3 GB for a million. Every case runs in a fresh subprocess whose
peak RSS above its start is read (``VmHWM``), so the figure is what one rank holds. Then a
thousand records are read back at random positions through the offset index.
Run ``python -m benchmarks.data_scale`` (``--records N``; ``--quick``: 20,000).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import RESULTS, environment, write_json

WORDS = (
    "the sky is blue and the grass is green while a small red circle sits on the left of a square "
    "she said that it would rain tomorrow so we stayed at home and read old letters"
).split()


def record(i: int, rng: random.Random) -> dict:
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
    units = " ".join(str(rng.randrange(6561)) for _ in range(rng.randint(80, 200)))
    return {
        "id": f"rec-{i:07d}",
        "tgt_units": units,
        "conversations": [
            {"from": "human", "value": f"Please answer question {i} aloud."},
            {"from": "gpt", "value": answer},
        ],
    }


def write_files(root: Path, records: int) -> dict:
    rng = random.Random(0)
    paths = {"JSON list": root / "data.json", "JSON Lines": root / "data.jsonl"}
    with open(paths["JSON list"], "w") as as_list, open(paths["JSON Lines"], "w") as as_lines:
        as_list.write("[\n")
        for i in range(records):
            line = json.dumps(record(i, rng))
            as_list.write(("" if i == 0 else ",\n") + line)
            as_lines.write(line + "\n")
        as_list.write("\n]\n")
    return paths


CHILD = """
import json, random, sys, time
from omnifast.training import get_stage, load_records
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
start = time.perf_counter()
records = load_records(sys.argv[1], get_stage("speech-gen"), 6561)
load_s = time.perf_counter() - start
rng = random.Random(0)
start = time.perf_counter()
for _ in range(1000):
    records[rng.randrange(len(records))]
read_s = (time.perf_counter() - start) / 1000
print(json.dumps({"records": len(records), "load_s": load_s, "read_one_s": read_s,
                  "peak_bytes": (kib("VmHWM") - before) * 1024}))
"""


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=None, help="records per file (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="20,000 records")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = args.records or (20_000 if args.quick else 1_000_000)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        paths = write_files(Path(scratch), count)
        print(f"wrote {count} records twice in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        for layout, path in paths.items():
            result = measure(path)
            rows.append({"layout": layout, "file_bytes": path.stat().st_size, **result})
    print(f"\nload_records: {count} speech-gen records, validated, in one fresh process")
    print(f"{'layout':12s} {'file MB':>9s} {'load s':>8s} {'records/s':>10s} {'peak MiB':>9s} {'read one':>10s}")
    for r in rows:
        print(
            f"{r['layout']:12s} {r['file_bytes'] / 1e6:9.0f} {r['load_s']:8.1f} {r['records'] / r['load_s']:10.0f} "
            f"{r['peak_bytes'] / 2**20:9.1f} {r['read_one_s'] * 1e6:8.0f} us"
        )
    path = write_json(
        Path(args.out) / f"{'quick_' if args.quick else ''}data_scale.json",
        {
            "op": "data_scale",
            "description": __doc__,
            "records": count,
            "environment": environment(__import__("torch").device("cpu")),
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
