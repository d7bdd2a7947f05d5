"""Backend choice: defaults by device, overrides, and a loud fallback."""

import warnings

import pytest
import torch

import omnifast
from omnifast.ops import _dispatch


def test_cpu_tensors_default_to_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("OMNIFAST_BACKEND", raising=False)
    assert _dispatch.choose_backend(torch.device("cpu")) == "cpu"


def test_cuda_tensors_default_to_triton(monkeypatch):
    monkeypatch.delenv("OMNIFAST_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_triton_importable", lambda: True)
    assert _dispatch.choose_backend(torch.device("cuda")) == "triton"


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setenv("OMNIFAST_BACKEND", "torch")
    assert _dispatch.choose_backend(torch.device("cpu")) == "torch"
    assert _dispatch.choose_backend(torch.device("cpu"), "cpu") == "cpu"


def test_unavailable_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_import_cpu_extension", lambda: (None, "not built (test)"))
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="not built"):
        assert _dispatch.choose_backend(torch.device("cpu"), "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose_backend(torch.device("cpu"), "cpu") == "torch"
    _dispatch._warn_once.cache_clear()


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _dispatch._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="triton"):
        assert _dispatch.choose_backend(torch.device("cpu"), "triton") == "torch"
    _dispatch._warn_once.cache_clear()


def test_fallback_is_still_right(monkeypatch):
    monkeypatch.setattr(_dispatch, "_import_cpu_extension", lambda: (None, "not built (test)"))
    _dispatch._warn_once.cache_clear()
    x = torch.randn(5, 1, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        fallback = omnifast.ctc_loss_with_logits(x, torch.tensor([[1, 2]]), [5], [2], backend="cpu")
    expected = torch.nn.functional.ctc_loss(x.log_softmax(-1), torch.tensor([[1, 2]]), [5], [2])
    torch.testing.assert_close(fallback, expected)
    _dispatch._warn_once.cache_clear()


@pytest.mark.parametrize("backend", _dispatch.BACKENDS)
def test_every_backend_keeps_the_backend_contract(backend):
    """What each op family asks of a backend, every backend has (the Protocols of ``_dispatch``)."""
    ctc = _dispatch.ctc_kernel(backend)
    assert isinstance(ctc, _dispatch.CTCKernels)
    assert isinstance(_dispatch.linear_ctc_kernels(backend), _dispatch.LinearCTCKernels)
    assert isinstance(_dispatch.moe_kernels(backend), _dispatch.MoEKernels)
    assert isinstance(_dispatch.fsq_kernels(backend), _dispatch.FSQKernels)


def test_a_kernel_launch_names_every_argument_of_the_kernel():
    from omnifast.kernels._launch import launch
    from omnifast.kernels.ctc import _split_kernel

    with pytest.raises(TypeError, match=r"_split_kernel: missing arguments \['buf_ptr'.*unknown arguments \['bogus'\]"):
        launch(_split_kernel, (1,), emit_ptr=None, bogus=1)
    with pytest.raises(TypeError):
        launch(_split_kernel, (1,), None)  # positional arguments are not taken
