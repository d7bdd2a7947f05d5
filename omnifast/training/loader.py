"""From records to micro-batches: the dataset (a record encoded by the processor, its audio read at
its own rate and resampled to the model's), the order of the micro-batches, and the DataLoader
that builds them in worker processes ahead of the step.

The order is a function of (seed, epoch, micro-batch) alone: each epoch is a seeded permutation of
the records cut into global batches of ``batch_size x world`` records, and rank r takes the r-th
slice of each. So a resumed run sees exactly the batches the uninterrupted run would have, N
processes with batch b see what one process with batch N x b sees, and the number of workers
changes nothing (a DataLoader returns its batches in order).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from omnifast.models.config import IMAGE_TOKEN, SPEECH_TOKEN
from omnifast.models.processor import IGNORE_INDEX, OmniProcessor, collate

from .data import DataError, Record


SPOKEN_INSTRUCTION = "Please answer the questions in the user's input speech."  # OpenOmni's (English) prompt


def spoken_choice(seed: int, epoch: int, record_id: str, speech_prob: float) -> bool:
    """Whether epoch ``epoch`` presents a record's questions spoken (a record with spoken
    alternatives): a coin of probability ``speech_prob`` that depends on (seed, epoch, record)
    alone, so every process, worker and resumed run draws the same."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < speech_prob


def conversation_of(record: Record, spoken: bool):
    """(turns, audio paths) of a record, its human turns replaced by their spoken versions
    (``<speech>`` and the instruction to answer it, the turn's ``<image>`` kept) when ``spoken``."""
    if not spoken or not record.spoken:
        return record.conversations, list(record.speech)
    turns, audios, human = [], [], 0
    for turn in record.conversations:
        if turn["from"] == "human":
            clip = record.spoken[human]
            human += 1
            if clip is not None:
                images = "".join(f"{IMAGE_TOKEN}\n" for _ in range(turn["value"].count(IMAGE_TOKEN)))
                turn = {**turn, "value": f"{images}{SPEECH_TOKEN}\n{SPOKEN_INSTRUCTION}"}
                audios.append(clip)
        turns.append(turn)
    return turns, audios


class ConversationDataset(torch.utils.data.Dataset):
    """Records encoded on access: the processor's input_ids / labels / media, plus units. A key
    is a record index, or (index, epoch) (the epoch decides a record's spoken or written form)."""

    def __init__(self, records: Sequence[Record], processor: OmniProcessor, seed: int = 0, speech_prob: float = 0.5):
        self.records, self.processor, self.seed, self.speech_prob = records, processor, seed, speech_prob

    def __len__(self) -> int:
        return len(self.records)

    def spoken(self, record: Record, epoch: int) -> bool:
        return bool(record.spoken) and spoken_choice(self.seed, epoch, record.id, self.speech_prob)

    def __getitem__(self, key) -> Dict[str, object]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        return self.encode(record, self.spoken(record, epoch))

    def encode(self, record: Record, spoken: bool) -> Dict[str, object]:
        turns, clips = conversation_of(record, spoken)
        images = [load_image(path, record, "image") for path in record.images]
        audios = [load_audio(path, record, self.processor.sampling_rate) for path in clips]
        item = self.processor.encode_conversation(turns, images, audios)
        item.update(id=record.id, tgt_units=record.tgt_units, re_tgt_units=record.re_tgt_units, spoken=spoken)
        return item


def load_image(path, record: Record, field_name: str = "image") -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"record {record.id}: {field_name}: {path}: {type(error).__name__}: {error}") from error


def load_audio(path, record: Record, rate: int) -> np.ndarray:
    """A clip as mono float32 samples at ``rate`` (resampled from the file's own rate)."""
    from omnifast.audio import AudioError, read_audio
    try:
        return read_audio(path, rate)[0]
    except AudioError as error:
        raise DataError(f"record {record.id}: speech: {error}") from error


def pad_units(rows: Sequence[Optional[List[int]]]) -> Optional[torch.Tensor]:
    if any(row is None for row in rows):
        return None
    out = torch.full((len(rows), max(len(r) for r in rows)), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def collate_batch(items: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, object]:
    batch = collate(items, pad_id)
    batch["ids"] = [item["id"] for item in items]
    batch["units"] = pad_units([item["tgt_units"] for item in items])
    batch["rejected_units"] = pad_units([item["re_tgt_units"] for item in items])
    return batch


class MicroBatches(torch.utils.data.Sampler):
    """This rank's record indices for micro-batches ``start`` to ``stop`` (see the module
    docstring for the order)."""

    def __init__(self, records: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0, stop: Optional[int] = None):
        self.records, self.batch_size, self.seed, self.rank, self.world = records, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = math.ceil(records / self.global_batch)
        self.start, self.stop = start, stop
        self._epoch, self._order = None, None

    def indices(self, micro: int) -> List[int]:
        epoch, index = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.records, generator=generator)
        chunk = self._order[index * self.global_batch:(index + 1) * self.global_batch]
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        """(record index, epoch) keys of each micro-batch."""
        micro = self.start
        while self.stop is None or micro < self.stop:
            epoch = micro // self.per_epoch
            yield [(index, epoch) for index in self.indices(micro)]
            micro += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless MicroBatches has no length")
        return max(0, self.stop - self.start)


def default_workers(device: torch.device) -> int:
    """4 worker processes feeding a GPU (fewer on a machine with fewer cores); none on the CPU,
    where workers would take cores from the step itself."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(dataset, batches: MicroBatches, workers: int, device: torch.device,
                collate_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batches``: ``workers`` processes (each builds whole micro-batches, two
    ahead of the step), memory pinned for a CUDA device. ``collate_fn`` defaults to padding
    encoded conversations (:func:`collate_batch`)."""
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used in forked workers
    if collate_fn is None:
        collate_fn = _Collate(dataset.processor.tokenizer.pad_token_id)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
        worker_init_fn=_worker_init if workers else None)


class _Collate:
    """A picklable collate function (workers receive it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate_batch(items, self.pad_id)
