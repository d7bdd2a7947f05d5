"""The benchmark script runs end to end (tiny shapes) and writes its table, JSON and chart.
No timing is asserted here: speed targets live in the benchmark's output, not in tests."""
import json

from omnifast import cli


def test_quick_benchmark_writes_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["bench", "ctc", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quick_ctc.json").read_text())
    assert (tmp_path / "quick_ctc.png").stat().st_size > 0
    names = set(payload["cases"][0]["results"])
    assert {"torch", "omnifast.ctc_loss", "omnifast.ctc_loss_with_logits"} <= names
    for case in payload["cases"]:
        for result in case["results"].values():
            assert result["median_s"] > 0 and result["peak_bytes"] >= 0
    assert "speed-up" in capsys.readouterr().out
