"""`omnifast bench gpu-check --dry-run` runs the GPU check's own code on the CPU at tiny shapes, so
that the script cannot rot between GPU loans: every part writes its JSON, the parity selection
(the tests marked gpu_check) collects and a few of its tests run under pytest-xdist, the summary
is rewritten after every part, a part over its budget is recorded and the run goes on, and what
a killed part leaves behind is removed."""

import json

from benchmarks import gpu_check
from omnifast import cli


def test_dry_run_writes_every_part_within_the_file_limits(tmp_path):
    assert cli.main(["bench", "gpu-check", "--dry-run", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(gpu_check.FILES) and len(files) == 7
    assert all((tmp_path / f).stat().st_size < 16 * 2**20 for f in files)
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["selection"]["returncode"] == 0 and parity["selection"]["tests"] > 100
    assert parity["pytest_status"] == 0 and parity["workers"] == 2
    assert parity["tests"] and all(entry["failed"] == 0 and entry["passed"] for entry in parity["tests"].values())
    assert parity["specialisations"] > 0  # counted over the xdist workers
    headline = json.loads((tmp_path / "headline.json").read_text())
    assert [row["case"] for row in headline["cases"]] == [c.name(True) for c in gpu_check.HEADLINE_CASES]
    assert headline["specialisations"] == 0  # CPU tensors run the C++ kernels: nothing for Triton here
    assert not any(case["error"] for case in headline["warm"]["cases"].values()), headline["warm"]
    for row in headline["cases"]:
        assert "error" not in row, row
        baseline = row["results"][row["baseline"]]
        assert baseline["median_s"] > 0 and len(row["results"]) >= 2
    step = json.loads((tmp_path / "train_step.json").read_text())
    assert {r["stage"] for r in step["rows"]} == {"speech-gen", "emotion-dpo"}
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["cases"] and all(case["kernels"] for case in profile["cases"])
    summary = (tmp_path / "summary.md").read_text()
    for part in gpu_check.PARTS:
        assert f"| {part} | 0 |" in summary
    for case in gpu_check.HEADLINE_CASES:
        assert f"| {case.name(True)} |" in summary
    assert "MISSED" not in summary and "met" not in summary.split("## headline")[1].split("## train_step")[0]


def test_a_part_over_its_budget_is_recorded_its_leftovers_removed_and_the_next_part_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.DRY_RUN_BUDGET_S, "train_step", 0.5)
    monkeypatch.setitem(gpu_check.DRY_RUN_BUDGET_S, "profile", 0.5)
    (tmp_path / "train_step.json.tmp").write_text("{half")  # what a part killed mid-write leaves
    runs = gpu_check.run_all(tmp_path, dry_run=True, parts=("train_step", "profile"))
    assert runs["train_step"]["status"] == "timeout" and runs["profile"]["status"] == "timeout"
    assert runs["train_step"]["removed"] == ["train_step.json.tmp"]
    assert set(p.name for p in tmp_path.iterdir()) <= set(gpu_check.FILES)
    log = (tmp_path / "log.txt").read_text()
    assert "train_step: TIMEOUT" in log and "===== profile" in log
    assert "| train_step | timeout |" in (tmp_path / "summary.md").read_text()


def test_a_failed_install_is_recorded_and_the_parts_still_run_from_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "install", lambda log: {"status": 1, "seconds": 0.1, "budget_s": 120})
    runs = gpu_check.run_all(tmp_path, dry_run=True, parts=("profile",), with_install=True)
    assert runs["install"]["status"] == 1 and runs["profile"]["status"] == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| install | 1 |" in summary and "| profile | 0 |" in summary
