"""gpu-check's ``summary.md``: one row per part and per case, from the JSON the parts wrote (a
part that died early shows what it finished, and its status)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _load(out: Path, name: str):
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # cannot happen with the atomic writes, but a summary must never fail
        return None


def _parts(runs: Dict[str, Dict[str, object]]):
    lines = ["| part | status | seconds | budget |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {r['status']} | {r['seconds']:.1f} | {r['budget_s']:.0f} |" for p, r in runs.items()]
    return lines


def _parity(parity) -> list:
    lines = [
        "",
        "## parity (the tests marked gpu_check, lowest rank first)",
        "",
        f"pytest: {parity.get('pytest_status', 'running')}, {_cell(parity.get('pytest_seconds'), '.1f')} s, "
        f"{parity.get('workers', '-')} workers, {parity.get('collected', '-')} tests collected, "
        f"{parity.get('specialisations', '-')} Triton specialisations launched",
        "",
        "| test | result | detail |",
        "| --- | --- | --- |",
    ]
    for name, entry in parity.get("tests", {}).items():
        verdict = "pass" if not entry["failed"] else "FAIL"
        detail = (
            f"{entry['passed']} passed, {entry['failed']} failed, {entry['skipped']} skipped, {entry['seconds']:.1f} s"
        )
        if entry["failures"]:
            detail += ": " + entry["failures"][0].replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {name} | {verdict} | {detail} |")
    return lines


def _headline(headline) -> list:
    warm = headline.get("warm", {})
    lines = [
        "",
        "## headline shapes (median of CUDA-event-timed forward+backward; peak above inputs)",
        "",
        f"every case first run once in {warm.get('workers', '-')} parallel processes "
        f"({_cell(warm.get('seconds'), '.1f')} s); {headline.get('specialisations', '-')} Triton specialisations "
        f"launched",
        "",
        "| case | implementation | ms | vs baseline | peak MiB | memory vs baseline | target | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
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
            lines.append(
                f"| {row['case']} | {name} | {r['median_s'] * 1e3:.2f} | {_cell(r.get('speedup'), '.2f')}x "
                f"| {r['peak_bytes'] / 2**20:.1f} | {_cell(r.get('memory_ratio'), '.2f')} | "
                f"{', '.join(targets) or '-'} | {verdict} |"
            )
        for name, why in row.get("skipped", {}).items():
            lines.append(f"| {row['case']} | {name} | - | - | - | - | - | not run: {why[:120]} |")
    return lines


def _train_step(step) -> list:
    lines = [
        "",
        f"## train_step ({step['config']}; {step.get('specialisations', '-')} Triton specialisations)",
        "",
        "| stage | implementation | setting | step s | vs recipe | whole run vs recipe | units/s | peak GiB | "
        "memory vs recipe | largest batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in step["rows"]:
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
        lines.append(
            f"| {r['stage']} | {r['implementation']} | {r['setting']} | {r['step_s']:.4f} | "
            f"{_cell(r.get('speedup_vs_recipe'), '.2f')}x | "
            f"{_cell(r.get('whole_run_speedup_vs_recipe'), '.2f')}x | {_cell(r.get('units_per_s'), '.0f')} | "
            f"{peak} | {_cell(r.get('memory_vs_recipe'), '.2f')} | {r.get('largest_batch') or '-'} |"
        )
    return lines


def _profile(profile) -> list:
    lines = [
        "",
        "## profile (top kernels; the whole tables are in profile.txt)",
        "",
        "| case | implementation | top kernels (self time, us) |",
        "| --- | --- | --- |",
    ]
    for row in profile["cases"]:
        top = "; ".join(f"{k['name'][:40]} {k['self_us']:.0f}" for k in row["kernels"][:4])
        lines.append(f"| {row['case']} | {row['implementation']} | {top} |")
    return lines


def summary_markdown(out: Path, runs: Dict[str, Dict[str, object]], dry_run: bool) -> str:
    lines = [f"# gpu-check{' (dry run on the CPU: tiny shapes, not a measurement)' if dry_run else ''}", ""]
    lines += _parts(runs)
    for name, render in (
        ("parity", _parity),
        ("headline", _headline),
        ("train_step", _train_step),
        ("profile", _profile),
    ):
        payload = _load(out, name)
        if payload:
            lines += render(payload)
    return "\n".join(lines) + "\n"
