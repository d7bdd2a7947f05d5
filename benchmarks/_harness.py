"""The protocol every benchmark follows: implementations of a case run in one process,
alternating, after warm-up; the median of repeated runs is reported with the ratio to the
baseline (on CUDA each run timed with CUDA events); peak memory above the inputs is measured for
each (case, implementation): on the CPU as peak RSS in a fresh subprocess (bounded in time, with
glibc's mmap threshold fixed so that the peak follows the bytes live at once), on CUDA as
``max_memory_allocated`` in this process. A comparator that fails on this build is dropped and
its error recorded. Results go to a table on stdout, ``<out>/<op>[-cuda].json`` (``--out``,
default ``bench-results/`` in the current directory) and a PNG chart beside it."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from omnifast import durable

# where results go unless --out says otherwise: a folder in the current directory, never the
# package's sources (the figures committed with omnifast were written with --out docs/results)
RESULTS = Path("bench-results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop_failing(
    fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int, failures: Dict[str, str]
) -> Dict[str, Callable[[], object]]:
    """Warm every implementation up; one that raises (a comparator that does not apply on this
    build, say) is dropped and its error kept in ``failures``."""
    kept = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            synchronize(device)
        except Exception as error:  # noqa: BLE001 - reported in the results, never hidden
            failures[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"skipped {name}: {failures[name]}", file=sys.stderr)
            continue
        kept[name] = fn
    return kept


def time_alternating(
    fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> Dict[str, List[float]]:
    """Seconds per call of each function, interleaved so drift hits all of them alike. On CUDA
    each call is timed with CUDA events (the GPU's own clock, launch gaps included)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000)
                continue
            start_s = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start_s)
    return times


def peak_memory_here(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``run`` above what is held before it (call in a fresh process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # ru_maxrss survives fork and exec (a child of a big parent starts "high"), so use the
    # address space's own high-water mark, reset to the current RSS just before the run.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _proc_status_kib("VmRSS")
        run()
        return (_proc_status_kib("VmHWM") - before) * 1024
    except OSError:  # no /proc (not Linux): fall back to the process-wide peak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


MEMORY_TIMEOUT_S = 300


def peak_memory_subprocess(module: str, case: int, impl: str, device: str) -> Optional[int]:
    """Run ``python -m <module> --memory-of CASE IMPL`` and read the bytes it prints (None, with
    a note, if it takes longer than MEMORY_TIMEOUT_S)."""
    # A fixed mmap threshold turns off glibc's sliding one, which after the first large free
    # serves later blocks from a heap it rarely trims: the RSS peak then depends on the order of
    # allocations (the same run read 69 or 134 MiB), not on the bytes live at once.
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), **os.environ}
    try:
        out = subprocess.run(
            [sys.executable, "-m", module, "--memory-of", str(case), impl, "--device", device],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=MEMORY_TIMEOUT_S,
        ).stdout
    except subprocess.TimeoutExpired:
        print(f"memory of {impl} not measured: over {MEMORY_TIMEOUT_S} s", file=sys.stderr)
        return None
    return int(out.strip().splitlines()[-1])


def peak_memory(
    benchmark: "Benchmark", case: int, impl: str, fn: Callable[[], object], device: torch.device
) -> Optional[int]:
    """Peak bytes above the inputs of one call. CUDA: in this process (the allocator's own peak
    counter, reset before the call). CPU: in a fresh subprocess (RSS cannot be reset here)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return peak_memory_here(fn, device)
    return peak_memory_subprocess(benchmark.module, case, impl, str(device))


def environment(device: torch.device) -> Dict[str, object]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summarise(times: Dict[str, List[float]], baselines: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """Median seconds of each implementation and its speed-up over its baseline."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        name: {"median_s": m, "vs": baselines[name], "speedup": medians[baselines[name]] / m, "runs": len(times[name])}
        for name, m in medians.items()
    }


def print_table(op: str, rows: Sequence[Dict[str, object]], baseline: str) -> None:
    print(f"\n{op}: median seconds per forward+backward, speed-up over the baseline named, peak MiB above inputs")
    header = f"{'case':28s} {'implementation':30s} {'median s':>10s} {'speed-up':>9s} {'vs':12s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for name, result in row["results"].items():
            peak = result.get("peak_bytes")
            peak_text = f"{peak / 2**20:9.1f}" if peak is not None else f"{'-':>9s}"
            print(
                f"{row['case']:28s} {name:30s} {result['median_s']:10.4f} "
                f"{result['speedup']:8.2f}x {result['vs']:12s} {peak_text}"
            )


def write_json(path: Path, payload, default: Optional[Callable[[object], object]] = None) -> Path:
    """``payload`` as indented JSON at ``path``: ``omnifast.durable.write_json``, so that a
    reader never sees half a file."""
    return durable.write_json(path, payload, indent=2, default=default)


def write_text(path: Path, text: str) -> Path:
    """``text`` at ``path`` (its folder made), written durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return durable.write_durably(path, lambda handle: handle.write(text.encode()))


def write_results(op: str, payload: Dict[str, object], baseline: str, out_dir: Path = RESULTS) -> Path:
    path = write_json(out_dir / f"{op}.json", payload)
    try:
        _plot(op, payload["cases"], baseline, out_dir / f"{op}.png")
    except ImportError:
        print("matplotlib is not installed: no chart written")
    return path


def _plot(op: str, rows, baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["results"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [row["results"][name]["median_s"] for row in rows], width, label=name)
        peaks = [(row["results"][name].get("peak_bytes") or 0) / 2**20 for row in rows]
        right.bar(xs, peaks, width, label=name)
    for axis, title in ((left, "median seconds (forward + backward)"), (right, "peak MiB above inputs")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        axis.set_xticklabels([row["case"] for row in rows], rotation=15, fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
    fig.suptitle(f"{op}: omnifast vs {baseline}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Benchmark:
    """One op family's benchmark: shapes, how to build inputs for a shape, and the
    implementations to compare (a dict name -> zero-argument callable doing forward+backward)."""

    op: str
    module: str
    shapes: List[Tuple[int, ...]]
    quick_shapes: List[Tuple[int, ...]]
    fields: str
    make_inputs: Callable
    implementations: Callable
    baseline: str = "torch"
    description: str = ""
    baselines: Dict[str, str] = None  # implementation -> the one it is compared with (default: baseline)
    extras: Callable = None  # (quick, device) -> {name: value}: measurements beside the table
    cuda_shapes: List[Tuple] = None  # the full run's shapes on a GPU (default: ``shapes``)

    def case_name(self, shape) -> str:
        return " ".join(f"{k}={v}" for k, v in zip(self.fields, shape))

    def shapes_for(self, device: torch.device, quick: bool) -> List[Tuple]:
        if quick:
            return self.quick_shapes
        return self.cuda_shapes if device.type == "cuda" and self.cuda_shapes else self.shapes

    def shape_of(self, case: int, device: torch.device):
        return self.shapes_for(device, False)[case] if case >= 0 else self.quick_shapes[-1 - case]

    def run(self, quick: bool, device: torch.device, repeats: int, memory: bool) -> Dict:
        rows = []
        shapes = self.shapes_for(device, quick)
        for index, shape in enumerate(shapes):
            inputs = self.make_inputs(shape, device)
            failures: Dict[str, str] = {}
            fns = _drop_failing(self.implementations(inputs, device), device, 1, failures)
            times = time_alternating(fns, device, repeats, warmup=0)
            baselines = {name: (self.baselines or {}).get(name, self.baseline) for name in times}
            results = summarise(times, {name: base if base in times else name for name, base in baselines.items()})
            if memory:
                case = -1 - index if quick else index
                for name in results:
                    results[name]["peak_bytes"] = peak_memory(self, case, name, fns[name], device)
            del inputs, fns
            row = {"case": self.case_name(shape), "shape": dict(zip(self.fields, shape)), "results": results}
            if failures:
                row["skipped"] = failures
            rows.append(row)
            print(f"done: {self.case_name(shape)}", file=sys.stderr)
        payload = {
            "op": self.op,
            "baseline": self.baseline,
            "description": self.description,
            "environment": environment(device),
            "repeats": repeats,
            "cases": rows,
        }
        if self.extras is not None:
            payload["extras"] = self.extras(quick, device)
        return payload

    def main(self, argv=None) -> int:
        parser = argparse.ArgumentParser(description=self.description)
        parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
        parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation")
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
        parser.add_argument("--out", default=str(RESULTS))
        parser.add_argument("--memory-of", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        device = torch.device(args.device)
        if args.memory_of:  # child process: one implementation, once, on fresh inputs
            shape = self.shape_of(int(args.memory_of[0]), device)
            fn = self.implementations(self.make_inputs(shape, device), device)[args.memory_of[1]]
            print(peak_memory_here(fn, device))
            return 0
        repeats = args.repeats or (2 if args.quick else 10 if device.type == "cuda" else 5)
        payload = self.run(args.quick, device, repeats, not args.no_memory)
        print_table(self.op, payload["cases"], self.baseline)
        for name, value in payload.get("extras", {}).items():
            print(f"{name}: {value}")
        name = self.op + ("-cuda" if device.type == "cuda" else "")
        path = write_results(f"quick_{name}" if args.quick else name, payload, self.baseline, Path(args.out))
        print(f"\nwrote {path} and {path.with_suffix('.png')}")
        return 0
