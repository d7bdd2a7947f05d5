"""Every GPU claim checked in one run that fits a short GPU loan: ``omnifast bench gpu-check --out DIR``
(``make gpu-check`` installs omnifast first and writes to ``$OUT`` or ``gpu_check/``).

Four parts run in this order, each in its own subprocess under its own time budget, so that a
crash or a hang in one is recorded and the next still runs:

1. ``parity``: the suite's GPU-relevant op and module tests in GPU test mode (a chosen set:
   CTC fused and drop-in in f32/bf16, linear-CTC, CTC-DPO sparse and dense, MoE dense and top-k on
   every GEMM engine, FSQ, the speech decoder's loss and stream == generate), then every headline
   shape below checked against the torch recipe (``F.ctc_loss`` through ``log_softmax``,
   ``NaiveMoE``): float32 within 1e-3 of the largest value, bf16 within twice the torch recipe's
   own bf16 error against float32.
2. ``headline``: the headline shapes of each op family against torch in the same dtype, timed
   with CUDA events, peak memory from ``max_memory_allocated`` (``HEADLINE_CASES``).
3. ``train_step``: stages 4 and 5 of the 7B model at batch 8 and the largest-batch search, the
   search capped in time.
4. ``profile``: a ``torch.profiler`` kernel table of the CTC and MoE headline cases.

``--out`` receives at most 8 files: ``parity.json``, ``headline.json``, ``train_step.json``,
``profile.json``, ``profile.txt``, ``summary.md`` (one row per case: time, ratio to torch, memory,
pass/fail) and ``log.txt`` (every part's output). ``--dry-run`` runs the same code on the CPU at
tiny shapes (the Triton kernels interpreted; the full test selection only collected, a few of
its tests run) in under 2 minutes; the test suite runs it.
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
# seconds per part on a GPU; with the install (about a minute) the whole run stays under 8 minutes
BUDGET_S = {"parity": 150, "headline": 120, "train_step": 100, "profile": 40}
# the dry run's parts take 3-25 s each on 2 idle cores and up to six times that on a loaded
# machine; a dry run checks what each part writes, not how fast (on the CPU train_step runs no
# batch-size search, so its budget does not lengthen the run)
DRY_RUN_BUDGET_S = {"parity": 180, "headline": 120, "train_step": 150, "profile": 120}
LOG_LIMIT = 15 * 2**20

# The suite's tests that exercise the GPU kernels (``-k "not cpu"`` drops the C++ backend's cases).
GPU_TESTS = (
    "tests/ops/test_ctc.py::test_triton_matches_reference",
    "tests/ops/test_ctc.py::test_edge_cases",
    "tests/ops/test_ctc.py::test_concatenated_and_unbatched_targets",
    "tests/ops/test_ctc.py::test_bf16_within_twice_the_reference_error",
    "tests/ops/test_ctc.py::test_triton_loss_is_the_same_with_and_without_a_gradient",
    "tests/ops/test_ctc.py::test_triton_with_speech_sized_tiles",
    "tests/ops/test_linear_ctc.py::test_triton_matches_unfused",
    "tests/ops/test_linear_ctc.py::test_bf16_within_twice_the_reference_error",
    "tests/ops/test_linear_ctc.py::test_triton_with_speech_sized_tiles_under_autocast",
    "tests/ops/test_ctc_dpo.py::test_triton_matches_unfused_recipe",
    "tests/ops/test_ctc_dpo.py::test_sparse_and_dense_paths_agree",
    "tests/ops/test_ctc_dpo.py::test_bf16",
    "tests/ops/test_moe.py::test_route_matches_reference",
    "tests/ops/test_moe.py::test_expert_mlp_matches_reference",
    "tests/nn/test_moe.py::test_triton_matches_naive",
    "tests/nn/test_moe.py::test_every_gemm_engine_of_the_triton_backend_matches_naive",
    "tests/ops/test_fsq.py::test_matches_reference",
    "tests/ops/test_mixed_precision.py",
    "tests/nn/test_speech_decoder.py::test_fused_loss_equals_ctc_on_full_logits",
    "tests/nn/test_speech_decoder.py::test_streaming_equals_one_full_pass",
)
DRY_RUN_TESTS = ("tests/ops/test_fsq.py::test_matches_reference",
                 "tests/nn/test_speech_decoder.py::test_streaming_equals_one_full_pass")


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
    Case("ctc", (16, 1200, 6561, 500), (2, 40, 30, 8),
         speedup_targets={"omnifast.ctc_loss_with_logits": 2.0, "omnifast.ctc_loss": 1.5}),
    Case("ctc", (32, 1500, 6561, 600), (2, 60, 30, 12),
         speedup_targets={"omnifast.ctc_loss_with_logits": 2.0, "omnifast.ctc_loss": 1.5}),
    Case("linear_ctc", (16, 1200, 896, 6562, 500), (2, 40, 16, 30, 8),
         speedup_targets={"omnifast.linear_ctc_loss": 1.0}, memory_targets={"omnifast.linear_ctc_loss": 1 / 8}),
    Case("linear_ctc", (16, 1200, 896, 6562, 500), (2, 40, 16, 30, 8), "bf16",
         speedup_targets={"omnifast.linear_ctc_loss": 1.0}, memory_targets={"omnifast.linear_ctc_loss": 1 / 8}),
    Case("ctc_dpo", (16, 1200, 896, 6562, 500), (2, 40, 16, 30, 8),
         speedup_targets={"omnifast (sparse)": 3.0}, memory_targets={"omnifast (sparse)": 1 / 8}),
    Case("ctc_dpo", (16, 1200, 896, 6562, 500), (2, 40, 16, 30, 8), "bf16",
         speedup_targets={"omnifast (sparse)": 3.0}, memory_targets={"omnifast (sparse)": 1 / 8}),
    Case("moe", (16384, 896, 3584, 896, 8, 2, 1, "bf16"), (64, 16, 32, 16, 8, 2, 1, "fp32"), "bf16", "NaiveMoE",
         speedup_targets={"omnifast.nn.MoE": 2.0}),
    Case("moe", (16384, 2048, 1024, 2048, 64, 8, 1, "bf16"), (64, 16, 8, 16, 16, 4, 1, "fp32"), "bf16", "NaiveMoE"),
    Case("moe", (16384, 3584, 3584, 3584, 4, 0, 4, "bf16"), (64, 16, 32, 16, 4, 0, 4, "fp32"), "bf16", "NaiveMoE"),
)
PROFILED = (0, 6)  # CTC (16,1200,6561,500) and MoE top-2 E8


def _benchmark(family: str):
    import importlib
    return importlib.import_module(f"omnifast.benchmarks.{family}").BENCHMARK


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
        return run(naive, torch.float32), {"NaiveMoE": run(naive, tokens.dtype),
                                           "omnifast.nn.MoE": run(MoE.from_naive(naive), tokens.dtype)}
    if case.family == "ctc":
        logits, targets, il, tl = x
        blank = logits.shape[-1] - 1
        fns = {"torch": lambda z: F.ctc_loss(z.log_softmax(-1), targets, il, tl, blank=blank, reduction="none"),
               "omnifast.ctc_loss": lambda z: omnifast.ctc_loss(z.log_softmax(-1), targets, il, tl, blank=blank,
                                                                reduction="none"),
               "omnifast.ctc_loss_with_logits": lambda z: omnifast.ctc_loss_with_logits(
                   z, targets, il, tl, blank=blank, reduction="none")}
        leaves = [logits]
    elif case.family == "linear_ctc":
        hidden, weight, bias, targets, il, tl = x
        blank = weight.shape[0] - 1

        def recipe(h, w, b):
            log_probs = F.linear(h, w, b).float().log_softmax(-1).transpose(0, 1)
            return F.ctc_loss(log_probs, targets, il, tl, blank=blank, reduction="none")
        fns = {"torch": recipe, "omnifast.linear_ctc_loss": lambda h, w, b: omnifast.linear_ctc_loss(
            h, w, b, targets, il, tl, reduction="none")}
        leaves = [hidden, weight, bias]
    else:
        refs = omnifast.ops.reference_logps(x["hidden"], x["ref_weight"], x["bias"], x["chosen"], x["rejected"],
                                            x["input_lengths"], x["chosen_lengths"], x["rejected_lengths"])
        blank = x["weight"].shape[0] - 1
        pairs = ((x["chosen"], x["chosen_lengths"]), (x["rejected"], x["rejected_lengths"]))

        def recipe(h, w, b):
            log_probs = F.linear(h, w, b).float().log_softmax(-1).transpose(0, 1)
            pw, pl = (-F.ctc_loss(log_probs, u, x["input_lengths"], n, blank=blank, reduction="none") for u, n in pairs)
            return -F.logsigmoid(0.1 * ((pw - refs[0]) - (pl - refs[1]))).mean()

        def ours(h, w, b):
            return omnifast.ctc_dpo_loss(h, w, b, x["chosen"], x["rejected"], x["input_lengths"], x["chosen_lengths"],
                                         x["rejected_lengths"], *refs).loss
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


def part_parity(out: Path, dry_run: bool, budget_s: float) -> None:
    payload: Dict[str, object] = {"tests": {}, "headline": []}
    path = out / "parity.json"
    reports = out / "parity-reports.jsonl.tmp"
    reports.unlink(missing_ok=True)
    env = {**os.environ, "OMNIFAST_TEST_DEVICE": "cpu" if dry_run else "cuda", "HYPOTHESIS_PROFILE": "gpu-check",
           REPORTS_VARIABLE: str(reports)}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "omnifast.benchmarks.gpu_check",
            "-k", "not cpu"]
    if dry_run:  # the whole selection must still be collectable; a few of its tests run
        collected = subprocess.run(base + ["--collect-only", *GPU_TESTS], capture_output=True, text=True, env=env)
        print(collected.stdout[-2000:], collected.stderr[-2000:])
        payload["collected"] = {"returncode": collected.returncode,
                                "tests": sum(1 for line in collected.stdout.splitlines() if "::" in line)}
        if collected.returncode != 0:
            raise SystemExit(f"the GPU test selection no longer collects:\n{collected.stdout[-3000:]}")
    start = time.monotonic()
    try:  # what finished before a timeout is kept: each test's report is appended as it ends
        run = subprocess.run(base + list(DRY_RUN_TESTS if dry_run else GPU_TESTS), env=env, text=True,
                             timeout=budget_s * 0.7, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(run.stdout[-20000:])
        payload["pytest_returncode"] = run.returncode
    except subprocess.TimeoutExpired:
        payload["pytest_returncode"] = "timeout"
    payload["pytest_seconds"] = time.monotonic() - start
    if reports.is_file():
        payload["tests"] = _test_summary(reports)
        reports.unlink()
    _write_json(path, payload)
    device = _device(dry_run)
    for case in HEADLINE_CASES:
        row = {"case": case.name(dry_run)}
        try:
            row["results"] = check_parity(case, device, dry_run)
            row["passed"] = all(r.get("passed", True) for r in row["results"].values())
        except Exception as error:  # noqa: BLE001 - recorded, and the next case still runs
            row.update(passed=False, error=f"{type(error).__name__}: {str(error)[:500]}")
        payload["headline"].append(row)
        print(f"parity {row['case']}: {'pass' if row['passed'] else 'FAIL'}", flush=True)
        _write_json(path, payload)
        _free(device)


REPORTS_VARIABLE = "OMNIFAST_GPU_CHECK_REPORTS"


def pytest_runtest_logreport(report) -> None:
    """pytest hook (this module is loaded with ``-p``): one JSON line per test phase that matters."""
    target = os.environ.get(REPORTS_VARIABLE)
    if not target or (report.when != "call" and report.passed):
        return
    with open(target, "a") as handle:
        handle.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                 "seconds": report.duration,
                                 "message": str(report.longrepr)[-400:] if report.failed else ""}) + "\n")


def _test_summary(path: Path) -> Dict[str, Dict[str, object]]:
    """{test function: {passed, failed, skipped, seconds, failures: [first lines]}}."""
    summary: Dict[str, Dict[str, object]] = {}
    for line in path.read_text().splitlines():
        report = json.loads(line)
        entry = summary.setdefault(report["nodeid"].split("[")[0],
                                   {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": []})
        entry["seconds"] += report["seconds"]
        entry[report["outcome"]] += 1
        if report["outcome"] == "failed":
            entry["failures"].append(f"{report['nodeid'].split('::')[-1]} ({report['when']}): {report['message']}")
    return summary


def part_headline(out: Path, dry_run: bool, budget_s: float) -> None:
    from ._harness import environment, peak_memory_here, time_alternating
    device = _device(dry_run)
    payload = {"environment": environment(device), "cases": []}
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
        print(f"headline {row['case']}: {'error' if 'error' in row else 'done'}", flush=True)
        _write_json(out / "headline.json", payload)
        del row
        _free(device)


def part_train_step(out: Path, dry_run: bool, budget_s: float) -> None:
    from . import train_step
    device = _device(dry_run)
    cases = len(train_step.STAGES) * len(train_step.IMPLEMENTATIONS)
    shape = {"prompt": 6, "response": 5, "units": 12} if dry_run else {"prompt": 64, "response": 60, "units": 300}
    shape["search_s"] = budget_s * 0.4 / cases
    payload = train_step.run("tiny" if dry_run else "openomni_7b", device, steps=1 if dry_run else 3,
                             batch=2 if dry_run else 8, records=8 if dry_run else 16, shape=shape, memory=False)
    _write_json(out / "train_step.json", payload)


def part_profile(out: Path, dry_run: bool, budget_s: float) -> None:
    from torch.profiler import ProfilerActivity, profile
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
            tables.append(f"## {case.name(dry_run)}: {name}\n\n"
                          + averages.table(sort_by=sort_by, row_limit=15, max_name_column_width=60))
            rows = sorted(averages, key=lambda e: getattr(e, sort_by), reverse=True)[:15]
            payload["cases"].append({"case": case.name(dry_run), "implementation": name, "sorted_by": sort_by,
                                     "kernels": [{"name": e.key, "calls": e.count,
                                                  "self_us": getattr(e, sort_by)} for e in rows]})
            print(f"profiled {case.name(dry_run)}: {name}", flush=True)
        _free(device)
    (out / "profile.txt").write_text("\n\n".join(tables) + "\n")
    _write_json(out / "profile.json", payload)


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


PART_FUNCTIONS = {"parity": part_parity, "headline": part_headline, "train_step": part_train_step,
                  "profile": part_profile}


# --- the driver: each part in a subprocess under its budget, then the summary --------------------

def run_part(part: str, out: Path, dry_run: bool, budget_s: float, log) -> Dict[str, object]:
    command = [sys.executable, "-m", "omnifast.benchmarks.gpu_check", "--part", part, "--out", str(out),
               "--budget", str(budget_s)] + (["--dry-run"] if dry_run else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    log.write(f"\n===== {part} (budget {budget_s:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        status = process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timeout"
    seconds = time.monotonic() - start
    log.write(f"===== {part}: {'exit ' + str(status) if status != 'timeout' else 'TIMEOUT'} after {seconds:.1f} s\n")
    log.flush()
    return {"status": status, "seconds": seconds, "budget_s": budget_s}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_markdown(out: Path, runs: Dict[str, Dict[str, object]], dry_run: bool) -> str:
    """One row per case of every part, from the JSON the parts wrote (a part that died early
    shows what it finished, and its status)."""
    def load(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    lines = [f"# gpu-check{' (dry run on the CPU: tiny shapes, not a measurement)' if dry_run else ''}", "",
             "| part | status | seconds | budget |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {r['status']} | {r['seconds']:.1f} | {r['budget_s']:.0f} |" for p, r in runs.items()]
    parity = load("parity")
    if parity:
        lines += ["", "## parity", "", "| case | result | detail |", "| --- | --- | --- |"]
        for name, entry in parity.get("tests", {}).items():
            verdict = "pass" if not entry["failed"] else "FAIL"
            detail = f"{entry['passed']} passed, {entry['failed']} failed, {entry['skipped']} skipped"
            if entry["failures"]:
                detail += ": " + entry["failures"][0].replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {name} | {verdict} | {detail} |")
        for row in parity.get("headline", []):
            detail = row.get("error") or ", ".join(
                f"{n}: {r['max_relative_error']:.2e}" + (f" (allowed {r['allowed']:.1e})" if "allowed" in r else "")
                for n, r in row["results"].items())
            lines.append(f"| {row['case']} | {'pass' if row['passed'] else 'FAIL'} | {detail} |")
    headline = load("headline")
    if headline:
        lines += ["", "## headline shapes (median of CUDA-event-timed forward+backward; peak above inputs)", "",
                  "| case | implementation | ms | vs baseline | peak MiB | memory vs baseline | target | result |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in headline["cases"]:
            if "error" in row:
                lines.append(f"| {row['case']} | - | - | - | - | - | - | ERROR: {row['error'][:150]} |")
                continue
            for name, r in row["results"].items():
                targets = []
                if "speedup_target" in r:
                    targets.append(f">= {r['speedup_target']:g}x")
                if "memory_target" in r:
                    targets.append(f"<= {r['memory_target']:.3g} memory")
                met = [r[k] for k in ("speedup_met", "memory_met") if k in r]
                verdict = "-" if not met else ("met" if all(met) else "MISSED")
                lines.append(f"| {row['case']} | {name} | {r['median_s'] * 1e3:.2f} | {_cell(r.get('speedup'), '.2f')}x "
                             f"| {r['peak_bytes'] / 2**20:.1f} | {_cell(r.get('memory_ratio'), '.2f')} | "
                             f"{', '.join(targets) or '-'} | {verdict} |")
            for name, why in row.get("skipped", {}).items():
                lines.append(f"| {row['case']} | {name} | - | - | - | - | - | not run: {why[:120]} |")
    step = load("train_step")
    if step:
        lines += ["", f"## train_step ({step['config']})", "",
                  "| stage | implementation | setting | step s | vs recipe | whole run vs recipe | units/s | peak GiB | "
                  "memory vs recipe | largest batch |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in step["rows"]:
            peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
            lines.append(f"| {r['stage']} | {r['implementation']} | {r['setting']} | {r['step_s']:.4f} | "
                         f"{_cell(r.get('speedup_vs_recipe'), '.2f')}x | "
                         f"{_cell(r.get('whole_run_speedup_vs_recipe'), '.2f')}x | {r['units_per_s']:.0f} | {peak} | "
                         f"{_cell(r.get('memory_vs_recipe'), '.2f')} | {r.get('largest_batch') or '-'} |")
    profile_payload = load("profile")
    if profile_payload:
        lines += ["", "## profile (top kernels; the whole tables are in profile.txt)", "",
                  "| case | implementation | top kernels (self time, us) |", "| --- | --- | --- |"]
        for row in profile_payload["cases"]:
            top = "; ".join(f"{k['name'][:40]} {k['self_us']:.0f}" for k in row["kernels"][:4])
            lines.append(f"| {row['case']} | {row['implementation']} | {top} |")
    return "\n".join(lines) + "\n"


def run_all(out: Path, dry_run: bool, parts=PARTS) -> Dict[str, Dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    budgets = DRY_RUN_BUDGET_S if dry_run else BUDGET_S
    runs = {}
    with open(out / "log.txt", "a") as log:
        for part in parts:
            runs[part] = run_part(part, out, dry_run, budgets[part], log)
            print(f"gpu-check {part}: {runs[part]['status']} in {runs[part]['seconds']:.1f} s", flush=True)
    log_path = out / "log.txt"
    if log_path.stat().st_size > LOG_LIMIT:  # keep the files returnable: the log's tail is what matters
        with open(log_path, "rb") as handle:
            handle.seek(-LOG_LIMIT, os.SEEK_END)
            tail = handle.read()
        log_path.write_bytes(b"[log cut to its last 15 MiB]\n" + tail)
    (out / "summary.md").write_text(summary_markdown(out, runs, dry_run))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON, summary.md, profile tables and log")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
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
    runs = run_all(out, args.dry_run, parts)
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(r["status"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
