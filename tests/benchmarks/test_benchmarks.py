"""The benchmark scripts run end to end (tiny shapes) and write their table, JSON and chart.
No timing is asserted here: speed targets live in the benchmarks' output, not in tests."""

import json

import pytest

from omnifast import cli

EXPECTED = {
    "ctc": {"torch", "omnifast.ctc_loss", "omnifast.ctc_loss_with_logits"},
    "linear_ctc": {"torch", "omnifast.linear_ctc_loss"},
    "ctc_dpo": {"torch", "omnifast (sparse)", "torch -norm", "omnifast (dense) -norm"},
    "moe": {"NaiveMoE", "omnifast.nn.MoE", "matmul lower bound"},
    "speech_decoder": {"OpenOmni-style", "omnifast SpeechDecoder"},
    "ar_dpo": {"OpenOmni four-pass", "omnifast"},
    "openomni_patch": {"OpenOmni", "OpenOmni + omnifast.openomni.patch"},
}


@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_quick_benchmark_writes_json_and_png(op, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["bench", op, "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / f"quick_{op}.json").read_text())
    assert (tmp_path / f"quick_{op}.png").stat().st_size > 0
    for case in payload["cases"]:
        assert set(case["results"]) == EXPECTED[op]
        for result in case["results"].values():
            assert result["median_s"] > 0 and result["peak_bytes"] >= 0 and result["speedup"] > 0
    assert "speed-up" in capsys.readouterr().out
    if op == "speech_decoder":
        assert payload["extras"]["streaming real-time factor"] > 0 and payload["extras"]["streaming units"] > 0


def test_quick_loader_and_data_scale_benchmarks_write_their_tables(tmp_path, capsys):
    assert cli.main(["bench", "loader", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quick_loader.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 2]
    assert all(r["records_per_s"] > 0 and 0 <= r["wait_share"] <= 1 for r in rows)
    assert cli.main(["bench", "data_scale", "--records", "3000", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quick_data_scale.json").read_text())["rows"]
    assert [r["records"] for r in rows] == [3000, 3000] and all(r["peak_bytes"] > 0 for r in rows)
    assert "waiting" in capsys.readouterr().out


def test_quick_length_spread_compares_padded_and_packed(tmp_path, capsys):
    assert (
        cli.main(
            [
                "bench",
                "length_spread",
                "--quick",
                "--cases",
                "padded,bucketed,packed",
                "--no-memory",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = {r["case"]: r for r in json.loads((tmp_path / "quick_length_spread.json").read_text())["rows"]}
    assert (
        rows["packed"]["padding_fraction"]
        == 0
        < rows["bucketed"]["padding_fraction"]
        < rows["padded"]["padding_fraction"]
    )
    assert all(r["units_per_s"] > 0 for r in rows.values())
    assert "vs padded" in capsys.readouterr().out


def test_quick_save_load_benchmark_compares_one_file_and_shards(tmp_path, capsys):
    assert cli.main(["bench", "save_load", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quick_save_load.json").read_text())["rows"]
    assert [r["layout"] for r in rows] == ["one file", "shards of 1MB"] and rows[1]["files"] > 1
    assert all(r["load_s"] > 0 and r["weight_bytes"] == rows[0]["weight_bytes"] for r in rows)
    assert "arithmetic for OpenOmni" in capsys.readouterr().out


def test_quick_ddp_step_benchmark_times_both_settings(tmp_path):
    assert cli.main(["bench", "ddp_step", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quick_ddp_step.json").read_text())
    assert set(payload["rows"]) == {"find_unused_parameters=True", "find_unused_parameters=False"}
    assert all(row["median_step_s"] > 0 for row in payload["rows"].values()) and payload["speedup"] > 0


def test_quick_lora_benchmark_measures_both_settings(tmp_path):
    assert cli.main(["bench", "lora", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quick_lora.json").read_text())
    full, lora = payload["rows"]["full fine-tuning"], payload["rows"]["LoRA r=16"]
    assert 0 < lora["trained_parameters"] < full["trained_parameters"]
    assert full["step_working_bytes"] > 0 and lora["step_s"] > 0


def test_the_microbenchmarks_run_under_pytest_benchmark():
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMNIFAST_BENCH_QUICK": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "benchmarks",
            "-k",
            "test_op and ctc- and not dpo",
            "--benchmark-disable",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
