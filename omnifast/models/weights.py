"""Model weights on disk in ``transformers``' layout: ``model.safetensors`` when the state fits
one shard, else ``model-00001-of-0000N.safetensors`` shards and ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``), split by
``huggingface_hub``. Each file is written to a temporary name, flushed and renamed; the index
is written after every shard it names. Loading fills a model built on the meta device shard by
shard, so the weights are held once, never a fresh initialisation plus a copy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Union

import torch
from torch import nn

from omnifast.durable import save_durably, write_json

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_weights(state: Dict[str, torch.Tensor], path, max_shard_size: Union[int, str] = "5GB") -> List[str]:
    """Write ``state`` into the folder ``path`` (shards of at most ``max_shard_size`` bytes, or
    a size such as ``"5GB"``; a tensor larger than that gets a shard of its own). Shards left by
    an earlier save that the new index does not name are removed. Returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    plan = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in plan.filename_to_tensors.items():
        shard = {name: state[name] for name in names}
        save_durably(path / filename, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if plan.is_sharded:
        write_json(
            path / INDEX_NAME,
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": plan.tensor_to_filename,
            },
        )
    kept = set(plan.filename_to_tensors) | ({INDEX_NAME} if plan.is_sharded else set())
    for stale in path.iterdir():
        if stale.name not in kept and (stale.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD.fullmatch(stale.name)):
            stale.unlink()
    return sorted(kept)


def weight_files(path) -> List[Path]:
    """The weight files of a saved folder, checked: the index's shards exist and lie in it."""
    from .safe_load import WeightsError, inside, read_json

    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} is not a safetensors index: it has no 'weight_map' of tensor -> shard")
        names = sorted(set(map(str, weight_map.values())))
        for name in names:
            if not inside(path, name, index).is_file():
                raise FileNotFoundError(f"{index} names {name}, which is missing from {path}")
        return [path / name for name in names]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def load_weights(
    model: nn.Module, path, device: Union[str, torch.device] = "cpu", allow_nonfinite: bool = False
) -> nn.Module:
    """Fill ``model`` (built on the meta device, or anywhere) from the folder ``path``, one shard
    at a time; every parameter and persistent buffer must be found, and nothing else; each
    tensor of the model's shape, floating where the model's is (in one floating dtype: the
    saved model's, another is cast with a warning) and finite unless ``allow_nonfinite``."""
    from .safe_load import WeightsError, check_tensors, floating_dtype, read_safetensors

    expected = model.state_dict()
    loaded, dtype = set(), None
    for shard in weight_files(path):
        tensors = read_safetensors(shard, device=str(device))
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise WeightsError(
                f"{shard} holds tensors this model does not have: {', '.join(unexpected[:5])}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        dtype = dtype or floating_dtype(tensors)
        model.load_state_dict(
            check_tensors(tensors, expected, shard, allow_nonfinite, dtype), strict=False, assign=True
        )
        loaded |= set(tensors)
        del tensors
    missing = sorted(set(expected) - loaded)
    if missing:
        raise WeightsError(
            f"{path} lacks tensors this model needs: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model


def rebuild_buffers(model: nn.Module, device) -> None:
    """Give the buffers a state dict does not hold (rotary frequencies, position ids) their values,
    after a model was built on the meta device (or with ``to_empty``): the rotary modules are
    rebuilt from their config, position ids are ranges."""
    for module in model.modules():
        if "inv_freq" in module._buffers:
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, value in fresh.named_buffers(recurse=False):
                module._buffers[name] = value.to(device)
            module.attention_scaling = fresh.attention_scaling
        if "position_ids" in module._buffers:
            ids = module._buffers["position_ids"]
            module._buffers["position_ids"] = torch.arange(ids.shape[-1], device=device).expand(ids.shape).clone()
    for name, buffer in model.named_buffers():
        if buffer.is_meta or (buffer.is_floating_point() and not torch.isfinite(buffer).all()):
            raise RuntimeError(f"buffer {name} was left without a value")
