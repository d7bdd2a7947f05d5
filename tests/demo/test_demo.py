"""``omnifast demo --quick`` end to end: corpus, tokenizer, judges, the pretraining stand-ins and
the five stages, evaluation, report. Checks that the report has every figure and each is a finite
number (the quick run trains too little for the figures themselves to mean anything)."""

import json
import math

from omnifast.cli import main
from omnifast.demo.report import numbers, table_rows
from omnifast.training.stages import PRETRAINING, STAGES


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    figures = numbers(results)
    spoken = results["latency_n"] > 0  # the quick run's decoder may speak no unit: no latency to measure
    assert len(figures) == (26 if spoken else 24) and all(math.isfinite(x) for x in figures), figures
    report = (out / "report.md").read_text()
    for what, analogue, measured, *_ in table_rows(results):
        assert f"| {what} | {analogue} | {measured} |" in report
    assert "nan" not in report.lower()
    for name in ("losses.png", "results.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "wavs" / "t2s-0.wav").is_file()  # empty where the quick decoder speaks no unit
    assert len(list((out / "wavs").glob("*-after-dpo.wav"))) >= 1
    for stage in PRETRAINING + STAGES:
        assert (out / "train" / f"{stage.index}-{stage.name}" / "model" / "model.safetensors").is_file()
    assert "A smoke run" in report and "MISSED" not in report and "## Targets" not in report
    for line in report.splitlines():  # each example on one line of the list, whatever the model wrote
        if line.startswith("- ") and " -> " in line:
            assert line.count(" -> ") in (1, 2)


def test_examples_are_escaped_for_markdown():
    from omnifast.demo.report import code

    assert code("two\nlines | and `ticks`") == "`` two lines \\| and `ticks` ``"
    assert code("") == "`   `"
