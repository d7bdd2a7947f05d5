"""Where a test's tensors live. The default test mode keeps everything on the CPU (the Triton
kernels through the interpreter). ``OMNIFAST_TEST_DEVICE=cuda`` moves the tensors of the torch and
triton backends, and of the module, model and training tests, to the GPU (compiled Triton); the
C++ backend's tests stay on the CPU, where it runs. Inputs are always drawn on the CPU (seeded
generators) and moved, so both modes test the same numbers."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("OMNIFAST_TEST_DEVICE", "cpu"))


def device_for(backend=None) -> torch.device:
    """The device a test of ``backend`` (None: a module or model test) runs on."""
    return torch.device("cpu") if backend == "cpu" else TEST_DEVICE


def moved(value, device):
    """``value`` with every tensor inside (dicts, lists, tuples, dataclass-free) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device) for v in value)
    return value
