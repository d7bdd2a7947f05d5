"""Reading weights and settings from disk without surprises, for every loader (``from_pretrained``,
``load_openomni``, ``load_components``, the speech decoder's, the tokenizer's and vocoder's): each
error names the file (and the tensor or key), a path a file names stays inside its folder, nothing
is unpickled, and the tensors a model receives are checked: the shape it has, a floating dtype
where it holds one (another floating dtype is cast, with a warning naming the tensor), and
finite values (``allow_nonfinite=True`` loads them anyway, for inspection)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

MAX_JSON_DEPTH = 64


class WeightsError(ValueError):
    """A weight or settings file that cannot be loaded as it is; the message names it."""


def read_json(path, what: str = "settings") -> Dict:
    """A JSON object from ``path``: a missing, malformed, non-object or absurdly nested file is a
    :class:`WeightsError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise WeightsError(f"{path}: nested too deeply to be a {what} file") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: a {what} file holds a JSON object, this one a {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise WeightsError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def inside(folder: Path, name, named_by: Path) -> Path:
    """``folder / name`` where ``name`` (written in ``named_by``) is a plain file name in it."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise WeightsError(f"{named_by} names {name!r}: the files it names must lie in {folder}")
    return folder / name


def read_safetensors(path, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or forged one is an error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own types for truncated or forged headers
        raise WeightsError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None


def read_torch_weights(path) -> Dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` of plain tensors, read with ``weights_only`` (nothing it holds runs)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise WeightsError(
            f"{path}: not a file of plain tensors (omnifast never unpickles objects or code; convert "
            f"it to safetensors with the library that wrote it): {str(error).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{path}: holds no mapping of names to tensors")
    return state


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    where,
    allow_nonfinite: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """``tensors`` checked against the tensors of the model that receives them (``expected``, on
    any device, the meta one included): the shape of each; a floating tensor where the model's
    is, cast to ``dtype`` (default: the model's) with a warning naming it when it differs;
    finite values. Returns the tensors to load."""
    out, cast = {}, []
    for name, tensor in tensors.items():
        if name not in expected:
            continue
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise WeightsError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(want.shape)}")
        if want.is_floating_point():
            if not tensor.is_floating_point():
                raise WeightsError(f"{where}: {name} holds {tensor.dtype} values where the model holds {want.dtype}")
            target = dtype or want.dtype
            if tensor.dtype != target:
                cast.append(f"{name} ({tensor.dtype})")
                tensor = tensor.to(target)
            if not allow_nonfinite and not torch.isfinite(tensor).all():
                raise WeightsError(
                    f"{where}: {name} holds NaN or infinite values (allow_nonfinite=True loads "
                    f"them anyway, to inspect them)"
                )
        elif tensor.dtype != want.dtype:
            raise WeightsError(f"{where}: {name} holds {tensor.dtype} values where the model holds {want.dtype}")
        out[name] = tensor
    if cast:
        warnings.warn(
            f"{where}: cast to {dtype or 'the model dtype'}: {', '.join(cast[:5])}{' ...' if len(cast) > 5 else ''}",
            stacklevel=3,
        )
    return out


def check_finite(module: torch.nn.Module, where, allow_nonfinite: bool = False) -> None:
    """Every floating parameter and buffer of a loaded module finite (else an error naming it)."""
    if allow_nonfinite:
        return
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise WeightsError(
                f"{where}: {name} holds NaN or infinite values (allow_nonfinite=True loads them "
                f"anyway, to inspect them)"
            )


def floating_dtype(tensors: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype most of the floating values are in."""
    sizes: Dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get) if sizes else None
