"""The suite's one tolerance table and the comparisons built on it. A failed comparison names the
value compared and says where the values differ and by how much (torch.testing's report: the
largest absolute and relative differences and their indices, and how many elements are off)."""

from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence

import torch

from .devices import moved

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    name: str = "value",
    atol: Optional[float] = None,
) -> None:
    """``actual`` equals ``expected`` within the tolerances of ``dtype`` (NaN equals NaN), compared
    in ``expected``'s dtype; ``atol`` widens the absolute tolerance."""
    tol = dict(TOL[dtype])
    if atol is not None:
        tol["atol"] = atol
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, equal_nan=True, msg=lambda report: f"{name} differs:\n{report}", **tol
    )


def assert_all_close(
    actual: Iterable[torch.Tensor],
    expected: Iterable[torch.Tensor],
    dtype: torch.dtype,
    names: Optional[Iterable[str]] = None,
) -> None:
    """Pairwise :func:`assert_close` in float64, e.g. a loss and each of its gradients."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{len(actual)} values against {len(expected)}"
    names = list(names) if names is not None else [f"output {i}" for i in range(len(actual))]
    for a, e, name in zip(actual, expected, names):
        assert_close(a.double(), e.double(), dtype, name)


def probe_like(value: torch.Tensor) -> torch.Tensor:
    """A fixed random upstream gradient shaped like ``value``, so each element's gradient counts
    with its own weight (a plain sum would hide a gradient that is right only on average)."""
    return torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def value_and_grads(
    fn,
    leaves: Sequence[Optional[torch.Tensor]],
    *args,
    device,
    dtype: Optional[torch.dtype] = None,
    context=None,
    probe: bool = False,
    **kwargs,
) -> List[torch.Tensor]:
    """``fn(*leaves, *args, **kwargs)`` run on ``device`` (leaves cast to ``dtype`` when given,
    inside ``context``, e.g. ``torch.autocast``) and the gradient of its sum, or with ``probe`` of
    its sum weighted by :func:`probe_like`, with respect to each leaf (a None leaf passes through
    and has none): [value, grad, ...], back on the CPU. Every gradient must come back in its
    leaf's dtype."""
    on_device = [
        None if t is None else t.detach().clone().to(device=device, dtype=dtype or t.dtype).requires_grad_()
        for t in leaves
    ]
    with context if context is not None else contextlib.nullcontext():
        value = fn(*on_device, *moved(args, device), **kwargs)
    scalar = (value.double() * probe_like(value).to(value.device)).sum() if probe and value.dim() else value.sum()
    params = [t for t in on_device if t is not None]
    grads = torch.autograd.grad(scalar, params)
    for name, grad, leaf in zip(range(len(params)), grads, params):
        assert grad.dtype == leaf.dtype, f"the gradient of leaf {name} is {grad.dtype}, its leaf {leaf.dtype}"
    return [value.detach().cpu()] + [g.cpu() for g in grads]
