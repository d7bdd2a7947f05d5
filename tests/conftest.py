"""Test set-up.

* Device: ``OMNIFAST_TEST_DEVICE=cpu`` (default) runs the Triton kernels on CPU tensors through the
  interpreter (set before any import of triton); ``OMNIFAST_TEST_DEVICE=cuda`` runs the same tests
  on CUDA tensors with compiled Triton (see ``tests/devices.py``), and skips every test cleanly
  where no GPU is present.
* Every Triton launch is recorded (``omnifast.kernels._launch``); ``tests/kernels/test_aot.py``
  runs last and compiles exactly the recorded set for sm_80 and sm_90.
* hypothesis runs a bounded number of examples so the suite stays fast (``HYPOTHESIS_PROFILE=
  thorough`` draws ten times more).
"""

import os

import pytest

TEST_DEVICE = os.environ.get("OMNIFAST_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"OMNIFAST_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "omnifast",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu-check",
    deadline=None,
    max_examples=8,
    derandomize=True,  # make gpu-check
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "omnifast"))

# Import the Triton kernels now, while TRITON_INTERPRET=1 is set: @triton.jit decides at import
# time whether a kernel is interpreted, and some tests run code with the variable unset.
import importlib  # noqa: E402

from omnifast.kernels import _launch  # noqa: E402
from omnifast.kernels.aot import KERNEL_MODULES  # noqa: E402

for _module in KERNEL_MODULES:
    importlib.import_module(_module)

_launch.record_launches()

TEST_PACKAGES = sorted(
    entry.name
    for entry in os.scandir(os.path.dirname(__file__))
    if entry.is_dir() and os.path.exists(os.path.join(entry.path, "__init__.py"))
)


def pytest_configure(config):
    config.addinivalue_line("markers", "last: run after every other test (it reads what they recorded)")
    config.addinivalue_line(
        "markers",
        "cpu_only: a CPU-side test (C++ kernels, the interpreter, CLI on "
        "the CPU) that the CUDA test mode does not repeat",
    )
    config.addinivalue_line("markers", "cuda_only: a test at real shapes that only the CUDA test mode runs")
    config.addinivalue_line(
        "markers",
        "gpu_check(rank): in `make gpu-check`'s GPU parity run (pytest -m gpu_check), "
        "lower ranks first: 1 every op family at its real shape, 2 the CTC family, "
        "3 linear-CTC, 4 CTC-DPO, 5 MoE, 6 the speech decoder, 7 packing, FSQ and "
        "mixed precision",
    )


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: order kept otherwise
    packages = {item.nodeid.split("/")[1] for item in items if item.nodeid.startswith("tests/")}
    config.omnifast_full_suite = set(TEST_PACKAGES) <= packages
    if TEST_DEVICE == "cpu":
        skip = pytest.mark.skip(reason="real shapes: runs in the CUDA test mode (OMNIFAST_TEST_DEVICE=cuda)")
        for item in items:
            if item.get_closest_marker("cuda_only"):
                item.add_marker(skip)
    if TEST_DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="OMNIFAST_TEST_DEVICE=cuda but no CUDA device is present")
        else:
            skip = pytest.mark.skip(reason="CPU-side test: runs in the default (cpu) test mode")
            items = [item for item in items if item.get_closest_marker("cpu_only")]
        for item in items:
            item.add_marker(skip)
