"""Backend choice: the one place where the torch reference, the C++ CPU kernels and the Triton
kernels meet.

CUDA tensors go to ``triton`` and CPU tensors to ``cpu`` (C++) unless ``backend=`` or the
``OMNIFAST_BACKEND`` environment variable (torch | cpu | triton) says otherwise. A backend that
cannot run here (no compiled extension, no triton, no GPU) falls back to the torch reference
with one warning. Triton runs on CPU tensors only under ``TRITON_INTERPRET=1``.

The backend contract: each op family asks for its kernels by name (``ctc_kernel``,
``linear_ctc_kernels``, ``moe_kernels``, ``fsq_kernels``) and gets an object with the methods of
the Protocol below, on every backend; each method's semantics are those of the function of the
same name in ``_reference.py`` (the specification the other two are tested against).
"""

from __future__ import annotations

import functools
import os
import warnings
from types import SimpleNamespace
from typing import Callable, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .checks import check_choice

BACKENDS = ("torch", "cpu", "triton")
Tensor = torch.Tensor


@runtime_checkable
class EagerCTCKernels(Protocol):
    """CTC on the cpu and torch backends: the loss and its gradient in one call."""

    lazy: bool

    def __call__(
        self,
        inputs: Tensor,
        targets: Tensor,
        input_lengths: Tensor,
        target_lengths: Tensor,
        blank: int,
        zero_infinity: bool,
        grad_scale: Tensor,
        from_logits: bool,
    ) -> Tuple[Tensor, Tensor]:
        """(nll (B,), gradient like ``inputs``): ``_reference.ctc_nll_and_grad``."""


@runtime_checkable
class LazyCTCKernels(Protocol):
    """CTC on the triton backend: log p and saved state in the forward, the gradient in the backward."""

    lazy: bool

    def forward(
        self,
        inputs: Tensor,
        targets: Tensor,
        input_lengths: Tensor,
        target_lengths: Tensor,
        blank: int,
        from_logits: bool,
        want_grad: bool,
    ):
        """(log p (B,), saved state or None): ``kernels/ctc.py:ctc_forward``."""

    def backward(
        self,
        inputs: Tensor,
        saved,
        target_lengths: Tensor,
        input_lengths: Tensor,
        coef: Tensor,
        poison: Tensor,
        from_logits: bool,
    ) -> Tensor:
        """The gradient like ``inputs``: ``kernels/ctc.py:ctc_backward``."""


@runtime_checkable
class LinearCTCKernels(Protocol):
    """The chunked CTC engine's three building blocks (``_ctc_engine.py``)."""

    def chunk_emissions(
        self,
        logits: Tensor,
        t0: int,
        input_lengths: Tensor,
        exts: Sequence[Tensor],
        target_lengths: Sequence[Tensor],
        emissions: Sequence[Tensor],
    ) -> Tensor:
        """Each set's state emissions of a chunk, written into ``emissions``; returns its lse (B, t)."""

    def ctc_states(
        self,
        emissions: Tensor,
        targets: Tensor,
        input_lengths: Tensor,
        target_lengths: Tensor,
        blank: int,
        want_occupancy: bool,
    ) -> Tensor:
        """log p (B,) from emissions (B, T, S); with ``want_occupancy`` occupancies overwrite them."""

    def chunk_grad(
        self,
        logits: Tensor,
        lse: Tensor,
        t0: int,
        input_lengths: Tensor,
        softmax_coef: Tensor,
        exts: Sequence[Tensor],
        target_lengths: Sequence[Tensor],
        occupancies: Sequence[Tensor],
        coefs: Sequence[Tensor],
        poison: Tensor,
    ) -> None:
        """A chunk's logits overwritten with their gradient."""


@runtime_checkable
class MoEKernels(Protocol):
    """Routing and the weighted combine (the triton backend adds its grouped GEMMs)."""

    def route(self, logits: Tensor, top_k: int, normalize: bool):
        """Probabilities, top-k weights and experts, lse, counts, offsets, order, position."""

    def unpermute(self, y: Tensor, position: Tensor, weights: Optional[Tensor], top_k: int) -> Tensor:
        """Each token's weighted sum of its slots' rows."""


@runtime_checkable
class FSQKernels(Protocol):
    def fsq_forward(
        self, z: Tensor, half_level: Tensor, offset: Tensor, shift: Tensor, half_width: Tensor, basis: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """(codes, indices) of finite scalar quantisation."""

    def fsq_backward(
        self, grad_codes: Tensor, z: Tensor, half_level: Tensor, shift: Tensor, half_width: Tensor
    ) -> Tensor:
        """The gradient with respect to ``z``."""


@functools.lru_cache(maxsize=None)
def _import_cpu_extension():
    """The C++ extension: the one built with the package, or the file named by
    ``OMNIFAST_EXTENSION`` (``make test-sanitize`` points it at a sanitizer build)."""
    path = os.environ.get("OMNIFAST_EXTENSION")
    try:
        if path:
            import importlib.util

            spec = importlib.util.spec_from_file_location("omnifast._C", path)
            if spec is None:
                raise ImportError(f"OMNIFAST_EXTENSION={path} is not a loadable extension module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, ""
        from omnifast import _C
    except ImportError as error:  # not built, or built against another torch
        return None, str(error)
    return _C, ""


def require_cpu_extension():
    """Return the compiled C++ extension, or raise ImportError saying why it is missing."""
    module, why = _import_cpu_extension()
    if module is None:
        raise ImportError(
            f"omnifast's C++ extension is not built: {why}. Run `make setup` or `pip install --no-build-isolation -e .`"
        )
    return module


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable(backend: str, device: torch.device) -> Optional[str]:
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got a {device.type} tensor"
        return None if _import_cpu_extension()[0] is not None else _import_cpu_extension()[1]
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def choose_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend an op on tensors of ``device`` runs on."""
    if backend is None:
        backend = os.environ.get("OMNIFAST_BACKEND") or None
        if backend is not None:
            check_choice("OMNIFAST_BACKEND", backend, BACKENDS)
    else:
        check_choice("backend", backend, BACKENDS)
    if backend is None:
        backend = "triton" if device.type == "cuda" else "cpu"
    why = _unavailable(backend, device)
    if why is None:
        return backend
    _warn_once(f"omnifast: backend {backend!r} is not available ({why}); using the torch reference")
    return "torch"


class _EagerCTC:
    """The cpu and torch backends form the gradient in the forward, scaled by the reduction's
    weights (one pass over the inputs while they are hot in cache); the backward multiplies by
    the upstream gradient. ``fn`` has the contract of ``_reference.ctc_nll_and_grad``."""

    lazy = False

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _LazyCTC:
    """The triton backend keeps the occupancies from the forward and writes the gradient in the
    backward, with the upstream gradient folded into its coefficients: no (T, B, C) buffer lives
    between forward and backward, and nothing is read back to the host."""

    lazy = True

    def __init__(self, module):
        self.forward, self.backward = module.ctc_forward, module.ctc_backward


def ctc_kernel(backend: str) -> EagerCTCKernels | LazyCTCKernels:
    """The CTC kernels of a backend: eager (``fn(inputs, targets, input_lengths, target_lengths,
    blank, zero_infinity, grad_scale, from_logits) -> (nll, grad)``, the contract of
    ``_reference.ctc_nll_and_grad``) or lazy (``forward`` / ``backward`` of ``kernels/ctc.py``)."""
    if backend == "cpu":
        return _EagerCTC(require_cpu_extension().ctc_nll_and_grad)
    if backend == "triton":
        from omnifast.kernels import ctc

        return _LazyCTC(ctc)
    from ._reference import ctc_nll_and_grad

    return _EagerCTC(ctc_nll_and_grad)


def linear_ctc_kernels(backend: str) -> LinearCTCKernels:
    """The three building blocks of fused linear-CTC: ``chunk_emissions``, ``ctc_states`` and
    ``chunk_grad``, with the contracts of their ``_reference`` versions."""
    if backend == "cpu":
        return require_cpu_extension()
    if backend == "triton":
        from omnifast.kernels import linear_ctc

        return linear_ctc
    from . import _reference

    return _reference


def moe_kernels(backend: str) -> MoEKernels:
    """``route``, ``unpermute`` and ``unpermute_backward`` (and on triton ``grouped_mm`` and
    ``grouped_weight_grad``), with the contracts of ``_reference.moe_route`` / ``moe_unpermute``."""
    if backend == "cpu":
        ext = require_cpu_extension()
        return SimpleNamespace(
            route=ext.moe_route, unpermute=ext.moe_unpermute, unpermute_backward=ext.moe_unpermute_backward
        )
    if backend == "triton":
        from omnifast.kernels import moe

        return moe
    from . import _reference

    return SimpleNamespace(route=_reference.moe_route, unpermute=_reference.moe_unpermute)


def fsq_kernels(backend: str) -> FSQKernels:
    """``fsq_forward`` and ``fsq_backward`` with the contracts of their ``_reference`` versions."""
    if backend == "cpu":
        return require_cpu_extension()
    if backend == "triton":
        from omnifast.kernels import fsq

        return fsq
    from . import _reference

    return _reference
