"""Many processes under ``torchrun``: the process group, DDP or FSDP2 around the model, and the
model's and optimizer's state gathered whole (for checkpoints and ``save_pretrained``) and put
back shard by shard.

FSDP2 (``fully_shard``) shards what trains: every transformer block of a trained component is its
own unit and the loss module (whose forward runs the whole step) the root; frozen components are
ignored by FSDP and stay whole on every rank. On CUDA with
bf16 the blocks compute in bf16 and reduce gradients in float32 (``MixedPrecisionPolicy``).
State moves through ``torch.distributed.checkpoint.state_dict``: gathered whole on rank 0 and
written by it, read by every rank and sharded by FSDP on load, so a checkpoint is the same file
whether it was written by one process, by DDP or by FSDP.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Tuple

import torch
from torch import nn


def init() -> Tuple[int, int]:
    """(rank, world size); the process group is started under torchrun (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def shutdown() -> None:
    """End the process group, if one was started: left to interpreter exit, its communication
    threads can still be running when the peers close their connections, and the process aborts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def blocks(component: nn.Module) -> Iterable[nn.Module]:
    """The repeated transformer blocks of a component (the children of each ``layers`` list)."""
    for name, module in component.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            yield from module


def shard(root: nn.Module, model: nn.Module, trains: Iterable[str], bf16_on_cuda: bool) -> nn.Module:
    """FSDP2 in place: every block of each trained component of ``model`` its own unit, ``root``
    (the loss module, whose forward runs the whole step) the root unit, frozen parameters left
    whole (see the module docstring); returns ``root``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from omnifast.models.omni import COMPONENTS

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_on_cuda
        else MixedPrecisionPolicy()
    )
    trains = set(trains)
    frozen = {
        p
        for name in COMPONENTS
        if name not in trains and getattr(model, name, None) is not None
        for p in getattr(model, name).parameters()
    } & set(root.parameters())
    for name in sorted(trains):
        for block in blocks(getattr(model, name)):
            fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy, ignored_params=frozen)
    return root


def wrap(
    root: nn.Module,
    model: nn.Module,
    trains: Iterable[str],
    world: int,
    fsdp: bool,
    device: torch.device,
    bf16: bool,
    find_unused: bool = False,
) -> nn.Module:
    """The module the training step calls: ``root`` itself (one process, or sharded in place with
    FSDP2), or a DistributedDataParallel around it. ``find_unused``: some step may leave a trained
    parameter without a gradient (a media encoder on a batch without its media); only then does
    DDP search the graph for them, an extra pass every step."""
    if world == 1:
        return root
    if fsdp:
        return shard(root, model, trains, bf16 and device.type == "cuda")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        root, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )


MEDIA_OF = {"vision": "images", "image_projector": "images", "speech": "speech", "speech_projector": "speech"}


def may_leave_unused(trains: Iterable[str], records) -> bool:
    """Whether a trained media encoder has records without its media (then a batch can leave it
    without a gradient)."""
    for component in trains:
        media = MEDIA_OF.get(component)
        if media is None:
            continue
        if hasattr(records, "count_with"):
            having = records.count_with(media)
        else:
            having = sum(bool(r.images if media == "images" else r.audio_files()) for r in records)
        if having < len(records):
            return True
    return False


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: nn.Module, trainable_only: bool) -> Dict[str, torch.Tensor]:
    """The whole (unsharded) state of ``model`` on the CPU, on rank 0 (other ranks get an empty
    dict); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only))
    if trainable_only:  # buffers are not trained
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a whole state (every rank passes the same) into ``model``, sharding where FSDP does."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict:
    """The optimizer's whole state keyed by parameter name, on rank 0; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict) -> None:
    """Put a whole optimizer state back. A trained parameter that never got a gradient (CLIP's
    last layer, when the features come from the one before) has no moments: that is not an error
    (the state was checked against the run before, in ``resume.py``)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(strict=False))


def gather_objects(value, world: int) -> list:
    if world == 1:
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def mean(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
