"""From records to micro-batches: the dataset (a record encoded by the processor, its audio read at
its own rate and resampled to the model's), the records' costs for token budgets, and the
DataLoader that builds the micro-batches in worker processes ahead of the step, in the order
``sampler.py`` gives (a function of seed, epoch and step alone, so the number of workers changes
nothing: a DataLoader returns its batches in order).
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from omnifast.models.config import IMAGE_TOKEN, SPEECH_TOKEN
from omnifast.models.processor import IGNORE_INDEX, OmniProcessor, collate

from .data import DataError, Record
from .sampler import MicroBatches, TokenBudgetBatches

__all__ = [
    "SPOKEN_INSTRUCTION",
    "spoken_choice",
    "conversation_of",
    "ConversationDataset",
    "load_image",
    "load_audio",
    "pad_units",
    "collate_batch",
    "collate_packed",
    "record_costs",
    "frame_costs",
    "response_tokens",
    "default_workers",
    "make_loader",
    "MicroBatches",
    "TokenBudgetBatches",
]


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
        positions = self.processor.config.llm.get("max_position_embeddings")
        if positions is not None and item["input_ids"].numel() > positions:
            raise DataError(
                f"record {record.id}: {item['input_ids'].numel()} tokens, more than the LLM's {positions} positions"
            )
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
        out[i, : len(row)] = torch.tensor(row)
    return out


def collate_batch(items: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, object]:
    batch = collate(items, pad_id)
    batch["ids"] = [item["id"] for item in items]
    batch["units"] = pad_units([item["tgt_units"] for item in items])
    batch["rejected_units"] = pad_units([item["re_tgt_units"] for item in items])
    return batch


def record_costs(records: Sequence[Record], processor: OmniProcessor) -> np.ndarray:
    """Each record's cost in a token budget: its LLM tokens."""
    return np.array([len(processor.tokenize(records[i].conversations)[0]) for i in range(len(records))], np.int64)


def response_tokens(records: Sequence[Record], processor: OmniProcessor) -> np.ndarray:
    """Each record's response tokens (its labelled positions): what the speech decoder upsamples."""
    counts = np.zeros(len(records), dtype=np.int64)
    for i in range(len(records)):
        _, labels = processor.tokenize(records[i].conversations)
        counts[i] = sum(label != IGNORE_INDEX for label in labels)
    return counts


def frame_costs(records: Sequence[Record], responses: np.ndarray, frames_factor: int) -> np.ndarray:
    """Each record's cost in a token budget of the speech stages: its decoder frames,
    max(factor x response tokens, its longest unit sequence)."""
    return np.array(
        [
            max(frames_factor * int(responses[i]), len(records[i].tgt_units or ()), len(records[i].re_tgt_units or ()))
            for i in range(len(records))
        ],
        np.int64,
    )


def ctc_frames_needed(units: Sequence[int]) -> int:
    """The fewest frames on which CTC can emit ``units``: one per unit, and a blank between each
    pair of equal neighbours."""
    return len(units) + sum(a == b for a, b in zip(units, units[1:]))


def units_that_do_not_fit(
    records: Sequence[Record], responses: np.ndarray, frames_factor: int, shared_frames: bool
) -> List[str]:
    """The records whose unit sequences no CTC path fits on the decoder's frames (factor x
    ``responses``, each record's response tokens, stretched to the longest of the record's
    sequences where ``shared_frames``, to each sequence's own length otherwise), each described."""
    problems = []
    for i in range(len(records)):
        record = records[i]
        sides = [
            (name, units)
            for name, units in (("tgt_units", record.tgt_units), ("re_tgt_units", record.re_tgt_units))
            if units
        ]
        if not sides:
            continue
        response = int(responses[i])
        longest = max(len(units) for _, units in sides)
        for name, units in sides:
            frames = max(frames_factor * response, longest if shared_frames else len(units))
            needed = ctc_frames_needed(units)
            if needed > frames:
                problems.append(
                    f"record {record.id}: {name}: {len(units)} units with {needed - len(units)} equal neighbours need "
                    f"{needed} CTC frames; the decoder makes {frames} ({frames_factor} x {response} response tokens)"
                )
    return problems


def collate_packed(items: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, object]:
    """Encoded conversations end to end: input_ids and labels (1, sum lengths) and ``lengths``
    (B,), with the media and units of :func:`collate_batch`."""
    batch = collate_batch(items, pad_id)
    lengths = batch["attention_mask"].sum(1)
    keep = batch["attention_mask"].bool()
    batch.update(
        input_ids=batch["input_ids"][keep][None],
        labels=batch["labels"][keep][None],
        lengths=lengths,
        attention_mask=None,
    )
    return batch


def default_workers(device: torch.device) -> int:
    """4 worker processes feeding a GPU (fewer on a machine with fewer cores); none on the CPU,
    where workers would take cores from the step itself."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(
    dataset, batches: MicroBatches, workers: int, device: torch.device, collate_fn=None, packed: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batches``: ``workers`` processes (each builds whole micro-batches, two
    ahead of the step), memory pinned for a CUDA device. ``collate_fn`` defaults to padding
    encoded conversations (:func:`collate_batch`)."""
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used in forked workers
    if collate_fn is None:
        collate_fn = _Collate(dataset.processor.tokenizer.pad_token_id, packed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        worker_init_fn=_worker_init if workers else None,
    )


class _Collate:
    """A picklable collate function (workers receive it)."""

    def __init__(self, pad_id: int, packed: bool = False):
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, items):
        return (collate_packed if self.packed else collate_batch)(items, self.pad_id)
