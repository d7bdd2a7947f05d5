"""A convergence check in the manner of Liger-Kernel's: the speech stages train the ``tiny`` model
for a few dozen steps on omnifast's fused C++ kernels and on the pure-torch reference ops, and
trace the same loss curve (float32: the kernels sum in another order, so equal within 1e-3)."""

import numpy as np
import pytest

from omnifast.training import read_metrics

from .test_training import train

STEPS = 24


@pytest.mark.parametrize("stage", ["speech-gen", "emotion-dpo"])
def test_fused_kernels_and_the_torch_reference_train_the_same_curve(data, tmp_path, monkeypatch, stage):
    curves = {}
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("OMNIFAST_BACKEND", backend)
        out = tmp_path / backend
        status = train(
            "--stage", stage, "--model", "tiny", "--data", data / f"{stage}.json", "--out", out,
            "--max-steps", STEPS, "--epochs", STEPS, "--save-every", 1000, "--batch-size", 2, "--seed", 0,
        )  # fmt: skip
        assert status == 0
        curves[backend] = np.array([row["loss"] for row in read_metrics(out / "metrics.jsonl")])
    fused, reference = curves["cpu"], curves["torch"]
    assert len(fused) == len(reference) == STEPS
    np.testing.assert_allclose(fused, reference, rtol=1e-3, atol=1e-5)
    assert fused[-4:].mean() < fused[:4].mean()  # and the curve goes down
