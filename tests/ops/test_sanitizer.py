"""``make test-sanitize`` runs the op tests on a C++ extension built with AddressSanitizer and
UndefinedBehaviorSanitizer. This test proves that build is the one loaded and that it catches a
planted out-of-bounds read (the kernels are called directly, past the argument checks that would
stop it). It runs only under that target (OMNIFAST_EXTENSION set)."""

import os
import subprocess
import sys

import pytest

PLANTED = """
import os
import torch
from omnifast.ops import _dispatch
extension = _dispatch.require_cpu_extension()
assert os.path.abspath(extension.__file__) == {path!r}, extension.__file__
extension.moe_unpermute(torch.randn(4, 8), torch.tensor([0, 1, 2, 400]), None, 1)  # row 400 of 4
"""


@pytest.mark.skipif(not os.environ.get("OMNIFAST_EXTENSION"), reason="runs under make test-sanitize")
def test_the_sanitizer_build_is_loaded_and_catches_an_out_of_bounds_read():
    path = os.path.abspath(os.environ["OMNIFAST_EXTENSION"])
    run = subprocess.run([sys.executable, "-c", PLANTED.format(path=path)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in run.stderr, run.stderr[-2000:]
