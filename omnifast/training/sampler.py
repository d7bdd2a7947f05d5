"""The order of the micro-batches, a function of (seed, epoch, micro-batch) alone: each epoch is a
seeded permutation of the records cut into global batches of ``batch_size x world`` records, and
rank r takes the r-th slice of each (``MicroBatches``), or the permutation is cut by a token
budget in length buckets (``TokenBudgetBatches``). So a resumed run sees exactly the batches the
uninterrupted run would have, and N processes with batch b see what one process with batch N x b
sees.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch


class MicroBatches(torch.utils.data.Sampler):
    """This rank's record indices for micro-batches ``start`` to ``stop`` (see the module
    docstring for the order)."""

    def __init__(
        self,
        records: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        stop: Optional[int] = None,
    ):
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
        chunk = self._order[index * self.global_batch : (index + 1) * self.global_batch]
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()

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

    def count(self, epoch: int) -> int:
        """Micro-batches in epoch ``epoch``."""
        return self.per_epoch

    def total(self, epochs: int, cap: Optional[int] = None) -> int:
        """Micro-batches in ``epochs`` epochs, or ``cap`` if there are at least that many (the
        epochs past it are not counted: a run capped by max_steps plans no more)."""
        if type(self).count is MicroBatches.count:  # every epoch alike
            whole = self.per_epoch * epochs
            return whole if cap is None else min(whole, cap)
        total = 0
        for epoch in range(epochs):
            total += self.count(epoch)
            if cap is not None and total >= cap:
                return cap
        return total


class TokenBudgetBatches(MicroBatches):
    """Micro-batches of at most ``max_tokens`` per process instead of a fixed size: each epoch's
    seeded permutation is cut into windows of ``window`` records, each window sorted by cost (the
    records of a micro-batch have similar lengths, so little is padded) and dealt in that order to
    the least-loaded rank, a global batch closing when the next record would take that rank past
    ``max_tokens`` (so every rank's share is within one record's cost of the others'); the global
    batches of an epoch are shuffled (seeded) so that long and short ones interleave. Everything
    is a function of (seed, epoch, step), the records' costs and the number of processes."""

    def __init__(
        self,
        costs: Sequence[int],
        max_tokens: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        stop: Optional[int] = None,
        window: int = 4096,
    ):
        self.costs = np.asarray(costs, dtype=np.int64)
        too_long = np.flatnonzero(self.costs > max_tokens)
        if too_long.size:
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than record #{int(too_long[0])}'s "
                f"{int(self.costs[too_long[0]])} tokens ({too_long.size} records are longer)"
            )
        self.records, self.max_tokens, self.seed, self.rank, self.world = len(self.costs), max_tokens, seed, rank, world
        self.window, self.start, self.stop = window, start, stop
        self._plans: Dict[int, List[List[List[int]]]] = {}
        self._counts: Dict[int, int] = {}
        self.per_epoch = None

    def plan(self, epoch: int) -> List[List[List[int]]]:
        """Epoch ``epoch``'s global batches, each as one list of record indices per rank."""
        if epoch not in self._plans:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.records, generator=generator).numpy()
            batches = []
            for start in range(0, self.records, self.window):
                window = order[start : start + self.window]
                window = window[np.argsort(self.costs[window], kind="stable")]
                ranks, loads = [[] for _ in range(self.world)], [0] * self.world
                for index in window.tolist():  # ascending cost: each to the least-loaded rank
                    cost = int(self.costs[index])
                    r = min(range(self.world), key=lambda k: (loads[k], k))
                    if loads[r] + cost > self.max_tokens:
                        batches.append(ranks)
                        ranks, loads = [[] for _ in range(self.world)], [0] * self.world
                        r = 0
                    ranks[r].append(index)
                    loads[r] += cost
                if any(ranks):
                    batches.append(ranks)
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            self._plans = {epoch: [batches[i] for i in shuffle]}  # one epoch kept at a time
            self._counts[epoch] = len(batches)
        return self._plans[epoch]

    def count(self, epoch: int) -> int:
        if epoch not in self._counts:
            self.plan(epoch)
        return self._counts[epoch]

    def locate(self, micro: int):
        epoch = 0
        while micro >= self.count(epoch):
            micro -= self.count(epoch)
            epoch += 1
        return epoch, micro

    def indices(self, micro: int) -> List[int]:
        epoch, index = self.locate(micro)
        return sorted(self.plan(epoch)[index][self.rank])

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        micro = self.start
        epoch, index = self.locate(micro)
        while self.stop is None or micro < self.stop:
            plan = self.plan(epoch)
            if index >= len(plan):
                epoch, index = epoch + 1, 0
                continue
            yield [(i, epoch) for i in sorted(plan[index][self.rank])]
            index += 1
            micro += 1
