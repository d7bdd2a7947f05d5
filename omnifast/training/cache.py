"""The state cache: stages 4 and 5 train only the speech decoder, so what the frozen front
(encoders, projectors, LLM) computes for a record never changes. ``build_cache`` runs it once
over every record under ``torch.inference_mode()`` and keeps what the decoder reads: the LLM
states at the response positions (in the dtype the training step would see) and the response
token ids, and for stage 5 the frozen reference decoder's log-likelihoods of the chosen and
rejected units (exact: the reference never changes). Training then holds only the decoder.

Under torchrun each rank builds the records ``position % world == rank``. The layout on disk and
the fingerprint of what made a cache are in ``cache_format.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from omnifast.durable import write_durably, write_json
from omnifast.models import OmniModel, OmniProcessor, response_states

from .cache_format import (
    FRONT,
    INDEX,
    SHARD_BYTES,
    VERSION,
    CacheError,
    differences,
    fingerprint,
    open_shard,
    reference_key,
)
from .data import Record
from .loader import ConversationDataset, collate_batch, pad_units, spoken_choice
from .references import ReferenceLogpCache
from .stages import Stage

__all__ = ["build_cache", "StateCache", "CachedDataset", "collate_cached", "CacheError", "fingerprint", "reference_key"]


# --- building -------------------------------------------------------------------------------------


@dataclass
class _Row:
    position: int
    variant: int
    states: torch.Tensor
    tokens: torch.Tensor
    reference: Optional[Tuple[float, float]]


def _variants(record: Record) -> Tuple[int, ...]:
    return (0, 1) if record.spoken else (0,)


def _done_positions(path: Path) -> set:
    done = set()
    for progress in sorted(path.glob("progress-r*.json")):
        for shard in json.loads(progress.read_text())["shards"]:
            with open_shard(path / shard) as handle:
                positions, variants = handle.get_tensor("positions"), handle.get_tensor("variants")
            done.update(zip(positions.tolist(), variants.tolist()))
    return done


class _ShardWriter:
    def __init__(self, path: Path, rank: int, dpo: bool):
        self.path, self.rank, self.dpo = path, rank, dpo
        self.progress = path / f"progress-r{rank}.json"
        self.shards = json.loads(self.progress.read_text())["shards"] if self.progress.is_file() else []
        self.rows: List[_Row] = []
        self.bytes = 0

    def add(self, row: _Row) -> None:
        self.rows.append(row)
        self.bytes += row.states.numel() * row.states.element_size()
        if self.bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        from safetensors.torch import save

        lengths = torch.tensor([r.states.shape[0] for r in self.rows])
        tensors = {
            "states": torch.cat([r.states for r in self.rows]).contiguous(),
            "tokens": torch.cat([r.tokens for r in self.rows]).contiguous(),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "positions": torch.tensor([r.position for r in self.rows]),
            "variants": torch.tensor([r.variant for r in self.rows]),
        }
        if self.dpo:
            tensors["reference"] = torch.tensor([r.reference for r in self.rows], dtype=torch.float64)
        name = f"shard-r{self.rank}-{len(self.shards):05d}.safetensors"
        write_durably(self.path / name, lambda handle: handle.write(save(tensors)))
        self.shards.append(name)
        write_json(self.progress, {"shards": self.shards})
        self.rows, self.bytes = [], 0


def build_cache(
    path,
    model: OmniModel,
    processor: OmniProcessor,
    records: Sequence[Record],
    stage: Stage,
    *,
    bf16: bool = False,
    device: Optional[torch.device] = None,
    max_tokens: int = 8192,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    dpo_normalization: str = "sum",
) -> "StateCache":
    """Build (or finish building) the state cache of ``records`` for ``stage`` at ``path`` and
    return it opened. An existing complete cache is returned as it is if it fits, refused if not."""
    from tqdm.auto import tqdm

    from . import distributed

    if stage.loss not in ("speech", "dpo"):
        raise ValueError(f"a state cache serves the speech stages (speech-gen, emotion-dpo), not {stage.name!r}")
    path = Path(path)
    expected = fingerprint(model, processor, stage, records, bf16, dpo_normalization)
    if (path / INDEX).is_file():
        return StateCache.open(path, expected, records)
    path.mkdir(parents=True, exist_ok=True)
    building = path / "building.json"
    if building.is_file():
        changed = differences(json.loads(building.read_text()), expected)
        if changed:
            raise CacheError(
                f"{path}: an unfinished cache build for other inputs is here ({'; '.join(changed)} "
                f"differ); remove it or choose another folder"
            )
    elif rank == 0:
        write_json(building, expected)
    distributed.barrier(world)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dpo = stage.loss == "dpo"
    done = _done_positions(path)
    todo = [(p, v) for p in range(rank, len(records), world) for v in _variants(records[p]) if (p, v) not in done]
    front = [m for m in (getattr(model, name) for name in FRONT) if m is not None]
    home = [next(m.parameters()).device for m in front]
    for module in front:
        module.to(device)
    decoder = model.speech_decoder.to(device) if dpo else None
    dataset = ConversationDataset(records, processor)
    writer = _ShardWriter(path, rank, dpo)
    bar = tqdm(total=len(todo), desc=f"state cache {stage.name}", disable=not progress)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(todo), 512):  # length-sorted batches within blocks of 512 records
            block = [(p, v, dataset.encode(records[p], bool(v))) for p, v in todo[start : start + 512]]
            block.sort(key=lambda entry: entry[2]["input_ids"].numel())
            for batch_entries in _token_batches(block, max_tokens):
                for row in _run(model, decoder, batch_entries, processor, device, dpo, dpo_normalization):
                    writer.add(row)
                bar.update(len(batch_entries))
    writer.flush()
    bar.close()
    for module, where in zip(front, home):
        module.to(where)
    distributed.barrier(world)
    if rank == 0:
        shards = sorted(
            s
            for progress_file in path.glob("progress-r*.json")
            for s in json.loads(progress_file.read_text())["shards"]
        )
        write_json(
            path / INDEX, {"version": VERSION, "fingerprint": expected, "shards": shards, "records": len(records)}
        )
        building.unlink(missing_ok=True)
    distributed.barrier(world)
    return StateCache.open(path, expected, records)


def _token_batches(block, max_tokens: int):
    batch, longest = [], 0
    for entry in block:
        length = entry[2]["input_ids"].numel()
        if batch and max(longest, length) * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(entry)
        longest = max(longest, length)
    if batch:
        yield batch


def _run(
    model: OmniModel, decoder, entries, processor: OmniProcessor, device, dpo: bool, dpo_normalization: str = "sum"
) -> List[_Row]:
    batch = collate_batch([item for _, _, item in entries], processor.tokenizer.pad_token_id)
    inputs = {
        k: (batch[k].to(device) if batch[k] is not None else None)
        for k in ("input_ids", "attention_mask", "labels", "pixel_values", "speech_features")
    }
    hidden = model(**inputs, text_loss=False).hidden_states
    states, tokens, mask = response_states(hidden, inputs["labels"])
    counts = mask.sum(1).tolist()
    references = [None] * len(entries)
    if dpo:
        chosen, rejected = decoder.reference_logps(
            states,
            tokens,
            batch["units"].to(device),
            batch["rejected_units"].to(device),
            hidden_mask=mask,
            text_mask=mask,
            normalization=dpo_normalization,
        )
        references = list(zip(chosen.double().tolist(), rejected.double().tolist()))
    return [
        _Row(p, v, states[i, : counts[i]].cpu().clone(), tokens[i, : counts[i]].cpu().clone(), references[i])
        for i, (p, v, _) in enumerate(entries)
    ]


# --- reading --------------------------------------------------------------------------------------


class StateCache:
    """A complete cache, opened: each record's states and tokens (and reference log-likelihoods)
    read from its shard on demand (memory-mapped by safetensors)."""

    def __init__(
        self, path: Path, index: Dict, where: np.ndarray, references: Optional[ReferenceLogpCache], ids: Dict[int, str]
    ):
        self.path, self.index, self.where, self.references = path, index, where, references
        self.fingerprint = index["fingerprint"]
        self._ids = ids
        self._handles: Dict[int, object] = {}
        self._offsets: Dict[int, torch.Tensor] = {}

    @classmethod
    def open(
        cls, path, expected: Optional[Dict[str, object]] = None, records: Optional[Sequence[Record]] = None
    ) -> "StateCache":
        """Open a complete cache; with ``expected`` (a fingerprint) refuse one made from anything
        else; with ``records`` refuse one that lacks any of them, naming it."""
        path = Path(path)
        if not (path / INDEX).is_file():
            raise CacheError(f"{path}: not a complete state cache (no {INDEX}; build it with omnifast cache)")
        index = json.loads((path / INDEX).read_text())
        if expected is not None:
            changed = differences(index.get("fingerprint", {}), expected)
            if changed:
                raise CacheError(
                    f"{path}: this state cache was made from other inputs: {'; '.join(changed)} "
                    f"differ. Rebuild it (omnifast cache) for this model and data"
                )
        count = index["records"]
        where = np.full((count, 2, 2), -1, dtype=np.int64)  # (position, variant) -> (shard, row)
        references = ReferenceLogpCache() if index["fingerprint"]["stage"] == "emotion-dpo" else None
        pending: Dict[Tuple[int, int], Tuple[float, float]] = {}
        for number, name in enumerate(index["shards"]):
            shard = path / name
            if not shard.is_file():
                raise CacheError(f"{shard}: listed in {path / INDEX} but missing")
            try:
                with open_shard(shard) as handle:
                    positions = handle.get_tensor("positions").tolist()
                    variants = handle.get_tensor("variants").tolist()
                    reference = handle.get_tensor("reference").tolist() if references is not None else None
            except Exception as error:  # noqa: BLE001 - safetensors raises its own types
                raise CacheError(f"{shard}: not a readable cache shard ({type(error).__name__}: {error})") from None
            for row, (position, variant) in enumerate(zip(positions, variants)):
                where[position, variant] = (number, row)
                if reference is not None:
                    pending[(position, variant)] = tuple(reference[row])
        ids: Dict[int, str] = {}
        if records is not None:
            if len(records) != count:
                raise CacheError(f"{path}: holds {count} records, the data has {len(records)}")
            missing = []
            for position in range(count):
                record = records[position]
                ids[position] = record.id
                for variant in _variants(record):
                    if where[position, variant, 0] < 0:
                        missing.append(f"{record.id}{' (spoken)' if variant else ''}")
            if missing:
                raise CacheError(
                    f"{path}: no states cached for record(s) {', '.join(missing[:10])}"
                    f"{' ...' if len(missing) > 10 else ''} ({len(missing)} missing)"
                )
            if references is not None:
                references.update_from({reference_key(ids[p], bool(v)): pair for (p, v), pair in pending.items()})
        return cls(path, index, where, references, ids)

    def lookup(self, position: int, spoken: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(states (n, H), tokens (n,)) of a record."""
        number, row = (int(v) for v in self.where[position, int(spoken)])
        if number < 0:
            raise CacheError(f"{self.path}: no states cached for record #{position}{' (spoken)' if spoken else ''}")
        if number not in self._handles:
            self._handles[number] = open_shard(self.path / self.index["shards"][number])
            self._offsets[number] = self._handles[number].get_tensor("offsets")
        handle, offsets = self._handles[number], self._offsets[number]
        start, stop = int(offsets[row]), int(offsets[row + 1])
        return handle.get_slice("states")[start:stop], handle.get_slice("tokens")[start:stop]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_offsets": {}}


class CachedDataset(torch.utils.data.Dataset):
    """The records of a speech stage read from a state cache: states, tokens and units (keys as
    :class:`ConversationDataset`'s, so the same sampler drives it)."""

    def __init__(self, records: Sequence[Record], cache: StateCache, seed: int = 0, speech_prob: float = 0.5):
        self.records, self.cache, self.seed, self.speech_prob = records, cache, seed, speech_prob

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> Dict[str, object]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        spoken = bool(record.spoken) and spoken_choice(self.seed, epoch, record.id, self.speech_prob)
        states, tokens = self.cache.lookup(index, spoken)
        return {
            "id": record.id,
            "states": states,
            "tokens": tokens,
            "tgt_units": record.tgt_units,
            "re_tgt_units": record.re_tgt_units,
            "spoken": spoken,
        }


def collate_cached(items: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Right-padded (B, N, H) states, (B, N) tokens and mask, units, ids: what the speech
    decoder's loss takes (the layout ``response_states`` gives in the uncached step)."""
    counts = [item["states"].shape[0] for item in items]
    N, H = max(max(counts), 1), items[0]["states"].shape[1]
    states = items[0]["states"].new_zeros(len(items), N, H)
    tokens = torch.zeros(len(items), N, dtype=torch.long)
    for i, item in enumerate(items):
        states[i, : counts[i]] = item["states"]
        tokens[i, : counts[i]] = item["tokens"]
    mask = torch.arange(N)[None] < torch.tensor(counts)[:, None]
    return {
        "ids": [item["id"] for item in items],
        "spoken": [item["spoken"] for item in items],
        "states": states,
        "tokens": tokens,
        "mask": mask,
        "units": pad_units([item["tgt_units"] for item in items]),
        "rejected_units": pad_units([item["re_tgt_units"] for item in items]),
    }
