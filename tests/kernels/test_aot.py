"""Every Triton specialisation the test suite launched compiles ahead of time for sm_80 and sm_90
(no GPU needed), and every kernel is launched by some test."""

import json
import os
import subprocess
import sys

import pytest

from omnifast.kernels import _launch


@pytest.mark.last
@pytest.mark.cpu_only
def test_every_launched_specialisation_compiles_for_sm80_and_sm90(request, tmp_path):
    specs = _launch.recorded()
    if not specs:
        pytest.skip("no Triton launch was recorded: run this test with the suite that launches the kernels")
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(specs))
    full = getattr(request.config, "omnifast_full_suite", False)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-m", "omnifast.kernels.aot", "--specs", str(path), "--arch", "80", "90"]
    run = subprocess.run(
        command + (["--require-all"] if full else []), capture_output=True, text=True, env=env, timeout=900
    )
    print(run.stdout)  # registers and spills of each, shown with pytest -s
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert f"compiled {2 * len(specs)} kernels, 0 failed" in run.stdout
    if full:
        assert "never launched" not in run.stdout


def test_launches_record_their_specialisation():
    import torch

    from omnifast.kernels import ctc

    spec = _launch.specialisation(
        ctc._split_kernel,
        {"emit_ptr": torch.zeros(1, dtype=torch.bfloat16), "buf_ptr": 3, "ext_ptr": 2**40},
        {"BLOCK_S": 16},
        8,
    )
    assert spec["kernel"] == "_split_kernel" and spec["module"] == "omnifast.kernels.ctc"
    assert list(spec["signature"].values()) == ["*bf16", "i32", "i64", "constexpr"]
    assert spec["constexprs"] == {"BLOCK_S": 16} and spec["num_warps"] == 8
