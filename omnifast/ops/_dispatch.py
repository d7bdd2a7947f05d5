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

from ._precision import scale_gradients
from .checks import check_choice

BACKENDS = ("torch", "cpu", "triton")
Tensor = torch.Tensor


@runtime_checkable
class CTCKernels(Protocol):
    """CTC on every backend: the forward returns the losses and what the backward needs; the
    backward turns the upstream gradient of each sequence's loss into the inputs' gradient."""

    def forward(
        self,
        inputs: Tensor,
        targets: Tensor,
        input_lengths: Tensor,
        target_lengths: Tensor,
        blank: int,
        zero_infinity: bool,
        weight: Tensor,
        from_logits: bool,
        want_grad: bool,
    ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """(nll (B,), saved tensors): ``weight`` (B,) is each sequence's share of the reduced
        loss, which the gradient carries; ``saved`` is empty without ``want_grad``."""

    def backward(self, saved: Tuple[Tensor, ...], grad_nll: Tensor) -> Tensor:
        """The gradient like ``inputs`` for an upstream gradient ``grad_nll``: a scalar (the
        reduced loss's) or (B,) (each sequence's loss, reduction "none")."""


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

    def __init__(self, fn: Callable):
        self.fn = fn

    def forward(
        self, inputs, targets, input_lengths, target_lengths, blank, zero_infinity, weight, from_logits, want_grad
    ):
        nll, grad = self.fn(
            inputs,
            targets,
            input_lengths,
            target_lengths,
            blank,
            zero_infinity,
            weight if want_grad else None,
            from_logits,
        )
        return nll, (grad,) if want_grad else ()

    def backward(self, saved, grad_nll):
        (grad,) = saved
        if grad_nll.dim() == 0:
            return scale_gradients((grad,), grad_nll)[0]
        return grad * grad_nll.to(grad.dtype)[None, :, None]


class _LazyCTC:
    """The triton backend keeps the occupancies from the forward and writes the gradient in the
    backward, with the upstream gradient folded into its coefficients: no (T, B, C) buffer lives
    between forward and backward, and nothing is read back to the host."""

    def __init__(self, module):
        self.module = module

    def forward(
        self, inputs, targets, input_lengths, target_lengths, blank, zero_infinity, weight, from_logits, want_grad
    ):
        ll, saved = self.module.ctc_forward(
            inputs, targets, input_lengths, target_lengths, blank, from_logits, want_grad
        )
        nll = -ll
        infeasible = torch.isinf(nll)
        if zero_infinity:
            nll = torch.where(infeasible, 0.0, nll)
        if not want_grad:
            return nll, ()
        flags = torch.tensor([zero_infinity, from_logits], device="cpu")  # saved as tensors, with the rest
        return nll, (inputs, weight, infeasible, input_lengths, target_lengths, flags, *saved)

    def backward(self, saved, grad_nll):
        inputs, weight, infeasible, input_lengths, target_lengths, flags, *state = saved
        zero_infinity, from_logits = (bool(f) for f in flags)
        coef = torch.where(infeasible, 0.0, weight * grad_nll.to(weight.dtype).reshape(-1))
        poison = infeasible & (not zero_infinity)
        return self.module.ctc_backward(inputs, state, target_lengths, input_lengths, coef, poison, from_logits)


def ctc_kernel(backend: str) -> CTCKernels:
    """The CTC kernels of a backend: eager on cpu and torch (``_reference.ctc_nll_and_grad``),
    lazy on triton (``ctc_forward`` / ``ctc_backward`` of ``kernels/ctc.py``)."""
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
