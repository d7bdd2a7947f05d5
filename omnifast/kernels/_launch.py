"""The one way omnifast launches a Triton kernel: every argument by its name in the kernel's
signature, checked against ``kernel.arg_names`` before the launch. Because every launch passes
here, the test suite can record each specialisation it runs (kernel, argument dtypes,
constexprs, warps) and compile exactly that set for real GPUs
(``omnifast.kernels.aot``, ``tests/kernels/test_aot.py``), including signatures only the
interpreter has seen so far (a bf16 buffer under autocast, say)."""

from __future__ import annotations

import inspect
import json
import os
from typing import Callable, Dict, List, Optional, Union

import torch

_DTYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}

_recorded: Optional[Dict[str, dict]] = None
_execute: Union[bool, Callable[[str], bool]] = True


def record_launches(enabled: bool = True, execute: Union[bool, Callable[[str], bool]] = True) -> None:
    """Start (or stop) recording the specialisations launched in this process. ``execute=False``
    records without running any kernel, and a function of the kernel's name runs those it
    returns True for: what a call at real shapes would launch, counted on a machine without a
    GPU (the kernels not run leave their outputs unwritten)."""
    global _recorded, _execute
    _recorded = {} if enabled else None
    _execute = True if not enabled else execute


def recorded() -> List[dict]:
    return list((_recorded or {}).values())


def save_recorded(path: str) -> None:
    with open(path, "w") as handle:
        json.dump(recorded(), handle, indent=1)


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


_CONSTEXPRS: Dict[object, frozenset] = {}  # kernel -> its constexpr parameter names


def _constexpr_names(kernel) -> frozenset:
    names = _CONSTEXPRS.get(kernel)
    if names is None:
        params = getattr(kernel, "params", None)  # a compiled JITFunction; the interpreter's has none
        if params is not None:
            names = frozenset(param.name for param in params if param.is_constexpr)
        else:
            names = frozenset(
                name
                for name, param in inspect.signature(kernel.fn).parameters.items()
                if "constexpr" in str(param.annotation)
            )
        _CONSTEXPRS[kernel] = names
    return names


def _split_arguments(kernel, arguments: Dict[str, object]):
    """The runtime arguments (in signature order) and the constexprs of a launch by name; a name
    missing from the launch or unknown to the kernel is a ``TypeError``."""
    names = kernel.arg_names
    missing = [name for name in names if name not in arguments]
    unknown = [name for name in arguments if name not in names]
    if missing or unknown:
        raise TypeError(f"launch of {kernel.fn.__name__}: missing arguments {missing}, unknown arguments {unknown}")
    constexpr = _constexpr_names(kernel)
    runtime = {name: arguments[name] for name in names if name not in constexpr}
    return runtime, {name: arguments[name] for name in names if name in constexpr}


def specialisation(
    kernel, runtime: Dict[str, object], constexprs: Dict[str, object], num_warps: int, num_stages: Optional[int] = None
) -> dict:
    """The compile-time identity of one launch, in a form ``triton.compile`` can be given again."""
    fn = kernel.fn
    signature = {name: _type_of(value) for name, value in runtime.items()}
    signature.update({name: "constexpr" for name in constexprs})
    spec = {
        "module": fn.__module__,
        "kernel": fn.__name__,
        "signature": signature,
        "constexprs": dict(sorted(constexprs.items())),
        "num_warps": num_warps,
    }
    if num_stages is not None:
        spec["num_stages"] = num_stages
    return spec


def launch(kernel, grid, *, num_warps: int = 4, num_stages: Optional[int] = None, **arguments) -> None:
    """``kernel[grid](...)`` with every argument of its signature given by name (runtime values and
    constexprs alike), recorded when recording is on."""
    runtime, constexprs = _split_arguments(kernel, arguments)
    if _recorded is not None:
        spec = specialisation(kernel, runtime, constexprs, num_warps, num_stages)
        _recorded.setdefault(json.dumps(spec, sort_keys=True), spec)
    if _execute is not True and not (callable(_execute) and _execute(kernel.fn.__name__)):
        return
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    kernel[grid](*runtime.values(), **options, **constexprs)


def target_arch(device: torch.device) -> Optional[int]:
    """The GPU architecture the kernels are configured for (90 for sm_90, ...): the device's own
    on CUDA; under the interpreter the one named by ``OMNIFAST_TRITON_ARCH`` (the tests set it to
    run, check and record the GPU configurations on the CPU), else None (small tiles)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    arch = os.environ.get("OMNIFAST_TRITON_ARCH")
    return int(arch) if arch else None
