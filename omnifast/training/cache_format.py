"""The state cache on disk, and the fingerprint of what made one.

On disk a cache is a folder of safetensors shards and ``index.json``:
* each shard holds whole records: ``states`` (rows of every record, concatenated), ``tokens``,
  ``offsets`` (where each record's rows start), ``positions`` (the record's place in the data
  file), ``variants`` (0: written question, 1: spoken, for records with both) and, for stage 5,
  ``reference`` (chosen, rejected); every shard is written durably (temporary file, fsync,
  rename) and listed in its rank's ``progress-r<rank>.json`` only once complete, so a killed build
  resumes with its finished shards and a half-written shard is never read;
* ``index.json``, written last, marks the cache complete: its shards and the fingerprint of what
  made it (the frozen weights, the processor and tokenizer, the model config, every record and its
  media files, the stage and the dtype). Training on a cache whose fingerprint differs from the
  run's refuses, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from omnifast.models import OmniModel, OmniProcessor
from omnifast.models.processor import image_settings

from .data import Record, data_fingerprint
from .stages import Stage

VERSION = 2
INDEX = "index.json"
FRONT = ("llm", "vision", "speech", "image_projector", "speech_projector")
SHARD_BYTES = 256 << 20


class CacheError(ValueError):
    """A state cache that does not fit the run (names what differs), or is incomplete."""


def reference_key(record_id: str, spoken: bool) -> str:
    """The key of a record's reference log-likelihoods (its spoken form is another input)."""
    return f"{record_id}#spoken" if spoken else str(record_id)


def open_shard(path: Path):
    """A shard, opened for reading tensors by name."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


# --- what made a cache ---------------------------------------------------------------------------


def module_digest(module: Optional[torch.nn.Module]) -> Optional[str]:
    """A digest of a module's state (names, dtypes, shapes and bytes of every tensor)."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def processor_digest(processor: OmniProcessor) -> str:
    tokenizer = processor.tokenizer
    described = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.all_special_tokens,
        "class": type(tokenizer).__name__,
        "system_prompt": processor.system_prompt,
        "image": image_settings(processor.config),
        "audio": processor.feature_extractor.to_dict(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(
    model: OmniModel,
    processor: OmniProcessor,
    stage: Stage,
    records: Sequence[Record],
    bf16: bool,
    dpo_normalization: str = "sum",
) -> Dict[str, object]:
    """Everything a cache's contents depend on (see the module docstring)."""
    out = {
        "version": VERSION,
        "stage": stage.name,
        "bf16": bool(bf16),
        "dpo_normalization": dpo_normalization if stage.loss == "dpo" else None,
        "model_config": json.loads(json.dumps(model.config.to_dict())),
        "processor": processor_digest(processor),
        "data": data_fingerprint(records),
    }
    out.update({f"weights.{name}": module_digest(getattr(model, name)) for name in FRONT})
    if stage.loss == "dpo":  # the reference is the decoder the stage starts from
        out["weights.reference"] = module_digest(model.speech_decoder)
    return out


def differences(saved: Dict[str, object], current: Dict[str, object]) -> List[str]:
    names = {
        "data": "the data (records or their media files)",
        "processor": "the processor or tokenizer",
        "model_config": "the model config",
        "weights.reference": "the reference decoder's weights",
    }
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            if key.startswith("weights.") and key != "weights.reference":
                out.append(f"the frozen {key[len('weights.') :]} weights")
            elif key in ("stage", "bf16", "version", "dpo_normalization"):
                out.append(f"{key} ({saved.get(key)!r} in the cache, {current.get(key)!r} here)")
            else:
                out.append(names.get(key, key))
    return out
