"""What a trained component's transformer blocks do besides compute: keep fewer activations
(activation checkpointing) and run compiled (``torch.compile``, one block at a time).

* ``selective`` checkpointing keeps the outputs of a block's matrix products and attention and
  recomputes only the cheap elementwise work between them (norms, rotary embedding, SwiGLU,
  residual adds) in the backward: a small recompute for most of the activation memory.
* ``full`` keeps only each block's input and recomputes the whole block in the backward.
* ``compile`` compiles each block (regional compilation: the blocks share their code, so one
  compile serves them all) with dynamic shapes, so batches of new lengths do not recompile.
The numbers are unchanged by checkpointing (the recompute is the same computation), and equal
to eager's within rounding when compiled.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .distributed import blocks

_SAVED = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "linear",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
}


def _selective_policy(ctx, op, *args, **kwargs):
    name = getattr(op, "__name__", str(op)).split(".")[0]
    return CheckpointPolicy.MUST_SAVE if name in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, selective: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    context = functools.partial(create_selective_checkpoint_contexts, _selective_policy) if selective else None
    extra = {"context_fn": context} if context is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_layer_options(
    model, trains: Iterable[str], activation_checkpointing: str = "off", compile_blocks: bool = False
) -> None:
    """Activation checkpointing (``off``/``selective``/``full``) and compilation for every block
    of the components named in ``trains`` (blocks of frozen components run without a graph)."""
    if activation_checkpointing not in ("off", "selective", "full"):
        raise ValueError(
            f"activation_checkpointing must be one of off, selective, full, got {activation_checkpointing!r}"
        )
    for name in trains:
        component = getattr(model, name, None)
        if component is None:
            continue
        for block in blocks(component):
            if activation_checkpointing != "off" and not getattr(block, "_omnifast_checkpointed", False):
                block.forward = functools.partial(_checkpointed, block.forward, activation_checkpointing == "selective")
                block._omnifast_checkpointed = True
            if compile_blocks and not getattr(block, "_omnifast_compiled", False):
                block.compile(dynamic=True)
                block._omnifast_compiled = True
