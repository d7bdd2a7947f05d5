"""Every GPU claim checked in one run that fits a short GPU loan: ``make gpu-check`` (or
``python -m benchmarks.gpu_check --install --out DIR`` from a checkout; results in
``$OUT`` or ``gpu_check/``).

It runs from the source tree: ``--install`` first tries ``pip install -e .`` without the C++
extension (``OMNIFAST_NO_EXTENSION=1``; gpu-check needs none of it), records how that went, and
goes on whatever the outcome. Then four parts run in this order, each in its own process under
its own time budget, so that a crash or a hang in one is recorded and the next still runs:

1. ``parity``: the suite's tests marked ``gpu_check`` in the GPU test mode, lowest rank first
   (the real-shape checks of every op family against its torch recipe, then the CTC family,
   linear-CTC, CTC-DPO, MoE, the speech decoder, packing, FSQ and mixed precision), in parallel
   under pytest-xdist (``gpu_check_plugin.py``). The first launch of each Triton specialisation
   compiles it; the parallel workers share that out and leave the compiled kernels in Triton's
   cache for the parts after.
2. ``headline``: the headline shapes of each op family against torch in the same dtype, timed
   with CUDA events, peak memory from ``max_memory_allocated`` (``HEADLINE_CASES``); every case is
   first run once in parallel processes, so that what compiles, compiles side by side.
3. ``train_step``: stages 4 and 5 of the 7B model at batch 8 and the largest-batch search, the
   search capped in time (checked inside each step).
4. ``profile``: a ``torch.profiler`` kernel table of the CTC and MoE headline cases.

Every part rewrites its JSON after every case and the driver rewrites ``summary.md`` after every
part, so whatever is killed, what finished is kept; leftovers are removed, and ``--out`` holds at
most the 7 files of ``FILES``. Each part records how many Triton specialisations it launched.
``--dry-run`` runs the same code on the CPU at tiny shapes (the Triton kernels interpreted; the
whole test selection collected, a few of its tests run); the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

PARTS = ("parity", "headline", "train_step", "profile")
# seconds per part on a GPU; with the install (seconds: nothing is compiled) about 6.5 minutes
BUDGET_S = {"parity": 150, "headline": 90, "train_step": 110, "profile": 30}
# the dry run's parts take 3-25 s each on 2 idle cores and up to six times that on a loaded
# machine; a dry run checks what each part writes, not how fast (on the CPU train_step runs no
# batch-size search, so its budget does not lengthen the run)
DRY_RUN_BUDGET_S = {"parity": 180, "headline": 120, "train_step": 150, "profile": 120}
INSTALL_BUDGET_S = 120
FILES = ("parity.json", "headline.json", "train_step.json", "profile.json", "profile.txt", "summary.md", "log.txt")
LOG_LIMIT = 15 * 2**20
TEST_FOLDERS = ("tests/ops", "tests/nn")  # where the tests marked gpu_check live
# the dry run's parity: a few of the selection's tests (a -k expression)
DRY_RUN_TESTS = "test_fsq or test_streaming_equals_one_full_pass or test_a_packed_decoder"


# --- the headline cases -------------------------------------------------------------------------


@dataclass
class Case:
    """One headline shape of an op family: the benchmark module that builds its inputs and
    implementations, the dtype it runs in, the torch recipe it is compared with, and the targets
    (minimum speed-up over that recipe, maximum share of its peak memory) it was built for."""

    family: str
    shape: Tuple
    dry_shape: Tuple
    dtype: str = "fp32"
    baseline: str = "torch"
    speedup_targets: Dict[str, float] = field(default_factory=dict)
    memory_targets: Dict[str, float] = field(default_factory=dict)

    def name(self, dry_run: bool) -> str:
        shape = self.dry_shape if dry_run else self.shape
        dtype = "" if self.family == "moe" else f" {self.dtype}"  # a MoE shape names its dtype
        return f"{self.family} {' '.join(map(str, shape))}{dtype}"


HEADLINE_CASES = (
    Case(
        "ctc",
        (16, 1200, 6561, 500),
        (2, 40, 30, 8),
        speedup_targets={"omnifast.ctc_loss_with_logits": 2.0, "omnifast.ctc_loss": 1.5},
    ),
    Case(
        "ctc",
        (32, 1500, 6561, 600),
        (2, 60, 30, 12),
        speedup_targets={"omnifast.ctc_loss_with_logits": 2.0, "omnifast.ctc_loss": 1.5},
    ),
    Case(
        "linear_ctc",
        (16, 1200, 896, 6562, 500),
        (2, 40, 16, 30, 8),
        speedup_targets={"omnifast.linear_ctc_loss": 1.0},
        memory_targets={"omnifast.linear_ctc_loss": 1 / 8},
    ),
    Case(
        "linear_ctc",
        (16, 1200, 896, 6562, 500),
        (2, 40, 16, 30, 8),
        "bf16",
        speedup_targets={"omnifast.linear_ctc_loss": 1.0},
        memory_targets={"omnifast.linear_ctc_loss": 1 / 8},
    ),
    Case(
        "ctc_dpo",
        (16, 1200, 896, 6562, 500),
        (2, 40, 16, 30, 8),
        speedup_targets={"omnifast (sparse)": 3.0},
        memory_targets={"omnifast (sparse)": 1 / 8},
    ),
    Case(
        "ctc_dpo",
        (16, 1200, 896, 6562, 500),
        (2, 40, 16, 30, 8),
        "bf16",
        speedup_targets={"omnifast (sparse)": 3.0},
        memory_targets={"omnifast (sparse)": 1 / 8},
    ),
    Case(
        "moe",
        (16384, 896, 3584, 896, 8, 2, 1, "bf16"),
        (64, 16, 32, 16, 8, 2, 1, "fp32"),
        "bf16",
        "NaiveMoE",
        speedup_targets={"omnifast.nn.MoE": 2.0},
    ),
    Case("moe", (16384, 2048, 1024, 2048, 64, 8, 1, "bf16"), (64, 16, 8, 16, 16, 4, 1, "fp32"), "bf16", "NaiveMoE"),
    Case("moe", (16384, 3584, 3584, 3584, 4, 0, 4, "bf16"), (64, 16, 32, 16, 4, 0, 4, "fp32"), "bf16", "NaiveMoE"),
)
PROFILED = (0, 6)  # CTC (16,1200,6561,500) and MoE top-2 E8


def _benchmark(family: str):
    import importlib

    return importlib.import_module(f"benchmarks.{family}").BENCHMARK


def _context(case: Case, device: torch.device):
    """bf16 cases of the linear-CTC family run under autocast (their parameters stay float32, as
    in training); MoE cases carry their dtype in their shape."""
    if case.dtype == "bf16" and case.family in ("linear_ctc", "ctc_dpo"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def implementations(case: Case, device: torch.device, dry_run: bool) -> Dict[str, Callable[[], object]]:
    benchmark = _benchmark(case.family)
    shape = case.dry_shape if dry_run else case.shape
    if case.family == "ctc_dpo":  # the sparse path is the one with a GPU target here
        fns = benchmark.implementations(benchmark.make_inputs(shape, device), device)
        fns = {name: fns[name] for name in ("torch", "omnifast (sparse)")}
    else:
        fns = benchmark.implementations(benchmark.make_inputs(shape, device), device)

    def under_context(fn):
        def run():
            with _context(case, device):
                return fn()

        return run

    return {name: under_context(fn) for name, fn in fns.items()}


# --- parity at the headline shapes -----------------------------------------------------------------


def _values(fn, leaves: List[torch.Tensor], context, module: Optional[torch.nn.Module] = None) -> List[torch.Tensor]:
    """The output of ``fn`` on fresh copies of ``leaves`` and the gradient of each leaf (and of
    each parameter of ``module``) through a fixed random probe of that output, in float32."""
    params = [t.detach().clone().requires_grad_() for t in leaves]
    with context:
        out = fn(*params)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    wrt = params + (list(module.parameters()) if module is not None else [])
    grads = torch.autograd.grad((out.float() * probe).sum(), wrt)
    return [out.detach().float()] + [g.float() for g in grads]


def parity_values(case: Case, device: torch.device, dry_run: bool):
    """(truth, {implementation: values}): the float32 recipe's output and gradients, and each
    implementation's in the case's dtype (the recipe's own included)."""
    import copy

    import omnifast
    from omnifast.nn import MoE

    benchmark = _benchmark(case.family)
    x = benchmark.make_inputs(case.dry_shape if dry_run else case.shape, device)
    exact, context = contextlib.nullcontext(), _context(case, device)
    if case.family == "moe":
        naive, _, tokens = x

        def run(module, dtype):
            module = copy.deepcopy(module).to(dtype)
            return _values(lambda z: module(z).output, [tokens.to(dtype)], exact, module)

        return run(naive, torch.float32), {
            "NaiveMoE": run(naive, tokens.dtype),
            "omnifast.nn.MoE": run(MoE.from_naive(naive), tokens.dtype),
        }
    if case.family == "ctc":
        logits, targets, il, tl = x
        blank = logits.shape[-1] - 1
        fns = {
            "torch": lambda z: F.ctc_loss(z.log_softmax(-1), targets, il, tl, blank=blank, reduction="none"),
            "omnifast.ctc_loss": lambda z: omnifast.ctc_loss(
                z.log_softmax(-1), targets, il, tl, blank=blank, reduction="none"
            ),
            "omnifast.ctc_loss_with_logits": lambda z: omnifast.ctc_loss_with_logits(
                z, targets, il, tl, blank=blank, reduction="none"
            ),
        }
        leaves = [logits]
    elif case.family == "linear_ctc":
        hidden, weight, bias, targets, il, tl = x
        blank = weight.shape[0] - 1

        def recipe(h, w, b):
            log_probs = F.linear(h, w, b).float().log_softmax(-1).transpose(0, 1)
            return F.ctc_loss(log_probs, targets, il, tl, blank=blank, reduction="none")

        fns = {
            "torch": recipe,
            "omnifast.linear_ctc_loss": lambda h, w, b: omnifast.linear_ctc_loss(
                h, w, b, targets, il, tl, reduction="none"
            ),
        }
        leaves = [hidden, weight, bias]
    else:
        refs = omnifast.ops.reference_logps(
            x["hidden"],
            x["ref_weight"],
            x["bias"],
            x["chosen"],
            x["rejected"],
            x["input_lengths"],
            x["chosen_lengths"],
            x["rejected_lengths"],
        )
        blank = x["weight"].shape[0] - 1
        pairs = ((x["chosen"], x["chosen_lengths"]), (x["rejected"], x["rejected_lengths"]))

        def recipe(h, w, b):
            log_probs = F.linear(h, w, b).float().log_softmax(-1).transpose(0, 1)
            pw, pl = (-F.ctc_loss(log_probs, u, x["input_lengths"], n, blank=blank, reduction="none") for u, n in pairs)
            return -F.logsigmoid(0.1 * ((pw - refs[0]) - (pl - refs[1]))).mean()

        def ours(h, w, b):
            return omnifast.ctc_dpo_loss(
                h,
                w,
                b,
                x["chosen"],
                x["rejected"],
                x["input_lengths"],
                x["chosen_lengths"],
                x["rejected_lengths"],
                *refs,
            ).loss

        fns = {"torch": recipe, "omnifast (sparse)": ours}
        leaves = [x["hidden"], x["weight"], x["bias"]]
    return _values(fns[case.baseline], leaves, exact), {name: _values(fn, leaves, context) for name, fn in fns.items()}


def _max_error(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """The largest difference over every output and gradient, relative to that tensor's largest
    magnitude (finite entries; a NaN where the other side has none counts as an infinite error)."""
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.equal(torch.isnan(x), torch.isnan(y)):
            return float("inf")
        keep = torch.isfinite(x) & torch.isfinite(y)
        if not keep.any():
            continue
        scale = y[keep].abs().max().clamp(min=1e-30)
        worst = max(worst, float((x[keep] - y[keep]).abs().max() / scale))
    return worst


def check_parity(case: Case, device: torch.device, dry_run: bool) -> Dict[str, object]:
    """float32: every implementation within 1e-3 of the recipe (relative to the largest value).
    bf16: every implementation's error against the float32 recipe at most twice the bf16 recipe's
    own (plus 1e-3)."""
    truth, runs = parity_values(case, device, dry_run)
    recipe_error = _max_error(runs[case.baseline], truth)
    results = {case.baseline: {"max_relative_error": recipe_error, "note": f"the {case.dtype} recipe against float32"}}
    for name, values in runs.items():
        if name != case.baseline:
            error, allowed = _max_error(values, truth), 2 * recipe_error + 1e-3
            results[name] = {"max_relative_error": error, "allowed": allowed, "passed": error <= allowed}
    return results


# --- the parts ------------------------------------------------------------------------------------


def _device(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda")


def _write_json(path: Path, payload) -> None:
    from ._harness import write_json

    write_json(path, payload, default=str)


def _specialisations() -> int:
    """Triton specialisations launched by this process so far."""
    from omnifast.kernels import _launch

    return len(_launch.recorded())


def _record_launches() -> None:
    from omnifast.kernels import _launch

    _launch.record_launches()


def part_parity(out: Path, dry_run: bool, budget_s: float) -> None:
    """The tests marked ``gpu_check`` in the GPU test mode, lowest rank first, in parallel
    (pytest-xdist, one worker per two cores, at most 8). The plugin rewrites ``parity.json``
    after every test; a dry run collects the whole selection and runs a few of its tests on the
    CPU."""
    from .gpu_check_plugin import PARITY_VARIABLE

    path = out / "parity.json"
    env = {
        **os.environ,
        "OMNIFAST_TEST_DEVICE": "cpu" if dry_run else "cuda",
        "HYPOTHESIS_PROFILE": "gpu-check",
        PARITY_VARIABLE: str(path),
    }
    base = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.gpu_check_plugin",
        "-m",
        "gpu_check",
    ]
    selection = None
    if dry_run:  # the whole selection must still be collectable
        collected = subprocess.run(
            base + ["-k", "not cpu", "--collect-only", *TEST_FOLDERS],
            capture_output=True,
            text=True,
            env={**env, PARITY_VARIABLE: ""},
        )
        print(collected.stdout[-2000:], collected.stderr[-2000:])
        selection = {
            "returncode": collected.returncode,
            "tests": sum(1 for line in collected.stdout.splitlines() if "::" in line),
        }
        if collected.returncode != 0:
            raise SystemExit(f"the GPU test selection no longer collects:\n{collected.stdout[-3000:]}")
    workers = 2 if dry_run else max(1, min(8, (os.cpu_count() or 2) // 2))
    keyword = f"not cpu and ({DRY_RUN_TESTS})" if dry_run else "not cpu"
    # the marked tests live in tests/ops and tests/nn; a module elsewhere that needs what the GPU
    # image lacks (soundfile, scipy) must not stop the run
    command = (
        base
        + ["-k", keyword, "--continue-on-collection-errors"]
        + (["-n", str(workers)] if _xdist() else [])
        + list(TEST_FOLDERS)
    )
    start = time.monotonic()
    try:
        run = subprocess.run(
            command, env=env, text=True, timeout=budget_s * 0.9, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        print(run.stdout[-20000:])
        status = run.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    payload = json.loads(path.read_text()) if path.is_file() else {"tests": {}}
    payload.update(pytest_status=status, pytest_seconds=time.monotonic() - start, workers=workers if _xdist() else 1)
    if selection is not None:
        payload["selection"] = selection
    _write_json(path, payload)


def _xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def _warm_case(index: int, dry_run: bool) -> Tuple[int, float, Optional[str]]:
    """Run every implementation of one headline case once (its kernels compiled into Triton's
    cache); (case index, seconds, error or None). Runs in a worker process."""
    start = time.monotonic()
    try:
        device = _device(dry_run)
        for fn in implementations(HEADLINE_CASES[index], device, dry_run).values():
            try:
                fn()
            except Exception:  # noqa: BLE001 - the timing loop records a comparator that does not apply
                pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        return index, time.monotonic() - start, None
    except Exception as error:  # noqa: BLE001 - reported with the case
        return index, time.monotonic() - start, f"{type(error).__name__}: {str(error)[:300]}"


def warm(dry_run: bool, workers: int) -> Dict[str, object]:
    """Every headline case run once, ``workers`` cases at a time in spawned processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        done = list(pool.map(_warm_case, range(len(HEADLINE_CASES)), [dry_run] * len(HEADLINE_CASES)))
    return {
        "seconds": time.monotonic() - start,
        "workers": workers,
        "cases": {HEADLINE_CASES[i].name(dry_run): {"seconds": s, "error": e} for i, s, e in done},
    }


def part_headline(out: Path, dry_run: bool, budget_s: float) -> None:
    from ._harness import environment, peak_memory_here, time_alternating

    _record_launches()
    device = _device(dry_run)
    payload = {"environment": environment(device), "cases": []}
    payload["warm"] = warm(dry_run, workers=2 if dry_run else min(len(HEADLINE_CASES), os.cpu_count() or 1))
    _write_json(out / "headline.json", payload)
    for case in HEADLINE_CASES:
        row: Dict[str, object] = {"case": case.name(dry_run), "baseline": case.baseline}
        try:
            fns = implementations(case, device, dry_run)
            failures = {}
            for name, fn in list(fns.items()):
                try:
                    fn()
                except Exception as error:  # noqa: BLE001 - a comparator that does not apply here
                    failures[name] = f"{type(error).__name__}: {str(error)[:300]}"
                    del fns[name]
            times = time_alternating(fns, device, repeats=2 if dry_run else 10, warmup=1)
            results = {}
            for name, values in times.items():
                median = sorted(values)[len(values) // 2]
                results[name] = {"median_s": median, "peak_bytes": peak_memory_here(fns[name], device)}
            base = results.get(case.baseline)
            for name, result in results.items():
                if base is not None:
                    result["speedup"] = base["median_s"] / result["median_s"]
                    result["memory_ratio"] = result["peak_bytes"] / max(base["peak_bytes"], 1)
                if dry_run:  # tiny shapes on the CPU say nothing about the GPU targets
                    continue
                if name in case.speedup_targets and base is not None:
                    result["speedup_target"] = case.speedup_targets[name]
                    result["speedup_met"] = result["speedup"] >= case.speedup_targets[name]
                if name in case.memory_targets and base is not None:
                    result["memory_target"] = case.memory_targets[name]
                    result["memory_met"] = result["memory_ratio"] <= case.memory_targets[name]
            row["results"] = results
            if failures:
                row["skipped"] = failures
        except Exception as error:  # noqa: BLE001 - recorded, and the next case still runs
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        payload["cases"].append(row)
        payload["specialisations"] = _specialisations()
        print(f"headline {row['case']}: {'error' if 'error' in row else 'done'}", flush=True)
        _write_json(out / "headline.json", payload)
        del row
        _free(device)


def part_train_step(out: Path, dry_run: bool, budget_s: float) -> None:
    from . import train_step

    _record_launches()
    device = _device(dry_run)
    cases = len(train_step.STAGES) * len(train_step.IMPLEMENTATIONS)
    shape = {"prompt": 6, "response": 5, "units": 12} if dry_run else {"prompt": 64, "response": 60, "units": 300}
    shape["search_s"] = budget_s * 0.25 / cases

    def keep(payload):  # after every case
        payload["specialisations"] = _specialisations()
        _write_json(out / "train_step.json", payload)

    keep(
        train_step.run(
            "tiny" if dry_run else "openomni_7b",
            device,
            steps=1 if dry_run else 2,
            batch=2 if dry_run else 8,
            records=8 if dry_run else 16,
            shape=shape,
            memory=False,
            on_row=keep,
        )
    )


def part_profile(out: Path, dry_run: bool, budget_s: float) -> None:
    from torch.profiler import ProfilerActivity, profile

    _record_launches()
    device = _device(dry_run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables, payload = [], {"cases": []}
    for index in PROFILED:
        case = HEADLINE_CASES[index]
        for name, fn in implementations(case, device, dry_run).items():
            fn()  # compiled and warm before the profiled call
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            averages = prof.key_averages()
            tables.append(
                f"## {case.name(dry_run)}: {name}\n\n"
                + averages.table(sort_by=sort_by, row_limit=15, max_name_column_width=60)
            )
            rows = sorted(averages, key=lambda e: getattr(e, sort_by), reverse=True)[:15]
            payload["cases"].append(
                {
                    "case": case.name(dry_run),
                    "implementation": name,
                    "sorted_by": sort_by,
                    "kernels": [{"name": e.key, "calls": e.count, "self_us": getattr(e, sort_by)} for e in rows],
                }
            )
            payload["specialisations"] = _specialisations()
            (out / "profile.txt").write_text("\n\n".join(tables) + "\n")
            _write_json(out / "profile.json", payload)
            print(f"profiled {case.name(dry_run)}: {name}", flush=True)
        _free(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


PART_FUNCTIONS = {
    "parity": part_parity,
    "headline": part_headline,
    "train_step": part_train_step,
    "profile": part_profile,
}


# --- the driver: install, each part in a process under its budget, the summary after each --------


def _source_tree() -> Path:
    return Path(__file__).resolve().parents[1]


def _environment() -> Dict[str, str]:
    """The parts import omnifast from this source tree, installed or not."""
    root = str(_source_tree())
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _run_logged(name: str, command: List[str], env: Dict[str, str], budget_s: float, log) -> Dict[str, object]:
    log.write(f"\n===== {name} (budget {budget_s:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=_source_tree()
    )
    try:
        status = process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timeout"
    seconds = time.monotonic() - start
    log.write(f"===== {name}: {'exit ' + str(status) if status != 'timeout' else 'TIMEOUT'} after {seconds:.1f} s\n")
    log.flush()
    return {"status": status, "seconds": seconds, "budget_s": budget_s}


def install(log) -> Dict[str, object]:
    """``pip install -e .`` of this checkout without the C++ extension; the parts run from the
    source tree whatever this returns."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    return _run_logged("install", command, {**_environment(), "OMNIFAST_NO_EXTENSION": "1"}, INSTALL_BUDGET_S, log)


def run_part(part: str, out: Path, dry_run: bool, budget_s: float, log) -> Dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--part",
        part,
        "--out",
        str(out.resolve()),
        "--budget",
        str(budget_s),
    ] + (["--dry-run"] if dry_run else [])
    env = _environment()
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return _run_logged(part, command, env, budget_s, log)


def remove_leftovers(out: Path) -> List[str]:
    """Everything in ``out`` but ``FILES`` (a killed part's temporary files) removed; their names."""
    import shutil

    removed = []
    for entry in out.iterdir():
        if entry.name not in FILES:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry.name)
    return removed


def _cap_log(path: Path) -> None:
    if path.stat().st_size > LOG_LIMIT:  # keep the files returnable: the log's tail is what matters
        with open(path, "rb") as handle:
            handle.seek(-LOG_LIMIT, os.SEEK_END)
            tail = handle.read()
        path.write_bytes(b"[log cut to its last 15 MiB]\n" + tail)


def run_all(out: Path, dry_run: bool, parts=PARTS, with_install: bool = False) -> Dict[str, Dict[str, object]]:
    from .gpu_check_report import summary_markdown

    out.mkdir(parents=True, exist_ok=True)
    budgets = DRY_RUN_BUDGET_S if dry_run else BUDGET_S
    runs: Dict[str, Dict[str, object]] = {}
    with open(out / "log.txt", "a") as log:
        steps = (["install"] if with_install else []) + list(parts)
        for step in steps:
            runs[step] = install(log) if step == "install" else run_part(step, out, dry_run, budgets[step], log)
            removed = remove_leftovers(out)
            if removed:
                runs[step]["removed"] = removed
                log.write(f"removed after {step}: {', '.join(removed)}\n")
                log.flush()
            print(f"gpu-check {step}: {runs[step]['status']} in {runs[step]['seconds']:.1f} s", flush=True)
            _cap_log(out / "log.txt")
            from ._harness import write_text

            write_text(out / "summary.md", summary_markdown(out, runs, dry_run))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON, summary.md, profile tables and log")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    parser.add_argument(
        "--install",
        action="store_true",
        help="first pip install -e . without the C++ extension (a failure is recorded, not fatal)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a part's own subprocess
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.part:
        PART_FUNCTIONS[args.part](out, args.dry_run, args.budget)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown parts {unknown}; the parts are {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; --dry-run runs the same code on the CPU at tiny shapes", file=sys.stderr)
        return 2
    runs = run_all(out, args.dry_run, parts, with_install=args.install)
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(r["status"] == 0 for name, r in runs.items() if name != "install") else 1


if __name__ == "__main__":
    sys.exit(main())
