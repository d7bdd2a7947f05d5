"""LoRA for the stages that train the LLM, through ``peft``: low-rank adapters in the LLM's
projections (``lora_targets``) train instead of its weights, so only the adapters (and whatever
else the stage trains) are in the optimizer and the checkpoints. When the stage ends the adapters
are merged into the weights (the saved model is a plain one: the next stage, the state cache's
fingerprint and ``from_pretrained`` see the merged weights), or with ``lora_save="adapters"``
the base weights are saved as they were and the adapters beside them in peft's layout
(``adapter_model.safetensors``, ``adapter_config.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
    )


def add_adapters(llm: nn.Module, config) -> nn.Module:
    """Adapters injected into ``llm`` in place; its own weights frozen, the adapters trainable.
    A target that names no module of the LLM is an error naming it."""
    from peft import inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    unknown = [t for t in config.lora_targets if t not in names]
    if unknown:
        raise ValueError(
            f"lora_targets: the LLM has no modules named {unknown}; its linear layers are "
            f"{sorted(n for n in names if n.endswith('_proj'))}"
        )
    inject_adapter_in_model(lora_config(config), llm)
    for name, param in llm.named_parameters():
        param.requires_grad_("lora_" in name)
    return llm


def has_adapters(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def adapter_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters' weights (peft's names, without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module)


def merge_adapters(module: nn.Module) -> nn.Module:
    """Each adapted layer replaced by its base layer with the adapter merged in (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge(safe_merge=True)
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    return module


def drop_adapters(module: nn.Module) -> nn.Module:
    """Each adapted layer replaced by its base layer, unmerged (the weights as they were)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    return module


def save_adapters(llm: nn.Module, config, path) -> None:
    """peft's layout: ``adapter_model.safetensors`` and ``adapter_config.json`` in ``path``."""
    from safetensors.torch import save_file

    from omnifast.durable import save_durably, write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(llm).items()}
    save_durably(path / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, {"format": "pt"}))
    settings = lora_config(config).to_dict()
    settings["target_modules"] = sorted(settings["target_modules"])
    write_json(
        path / "adapter_config.json",
        {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
    )
