"""Evaluation during training (``--eval-data FILE --eval-every N``): the stage's loss on held-out
records as ``eval/loss``, for the speech stages the decoder's unit error rate
(``eval/unit_error_rate``), for CTC-DPO the held-out rewards (``eval/rewards/accuracies``,
``eval/rewards/margins``, ...), and which checkpoint is best by a named metric (``--keep-best``).

Every process evaluates its share of the records through the same wrapped loss module the step
runs (so DDP and FSDP need nothing else), with the same number of micro-batches on every process
(a short share is padded with records that count for nothing); the sums are reduced across
processes. CTC-DPO's held-out pairs get their own reference log-likelihoods, computed by the
frozen reference (or, with a state cache, read from the held-out records' own cache).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import Record
from .references import ReferenceLogpCache

HIGHER_IS_BETTER = ("accuracies", "accuracy", "margins", "rewards/chosen")


def better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (accuracies and rewards: higher; losses and
    error rates: lower)."""
    if best is None:
        return math.isfinite(value)
    higher = any(metric.endswith(suffix) for suffix in HIGHER_IS_BETTER)
    return value > best if higher else value < best


class HeldOut:
    """Held-out records evaluated by a trainer (see the module docstring)."""

    def __init__(self, trainer, records: Sequence[Record], state_cache_dir=None):
        from .cache import CachedDataset, build_cache
        from .loader import ConversationDataset

        self.trainer, self.records = trainer, records
        if not len(records):
            raise ValueError("eval_data: no records")
        self.references = ReferenceLogpCache() if trainer.stage.loss == "dpo" else None
        if trainer.state_cache is not None:
            cache = build_cache(
                state_cache_dir,
                trainer.model,
                trainer.processor,
                records,
                trainer.stage,
                bf16=trainer.bf16,
                device=trainer.device,
                progress=False,
                rank=trainer.rank,
                world=trainer.world,
                dpo_normalization=trainer.config.dpo_normalization,
            )
            self.dataset = CachedDataset(records, cache, trainer.config.seed, 0.0)
            if self.references is not None:
                self.references = cache.references
        else:
            self.dataset = ConversationDataset(records, trainer.processor, trainer.config.seed, 0.0)

    def shares(self) -> List[List[Tuple[int, float]]]:
        """This process's micro-batches of (record index, weight): records rank, rank + world, ...,
        padded with weight-0 repeats so every process runs as many micro-batches."""
        world, rank, size = self.trainer.world, self.trainer.rank, self.trainer.config.batch_size
        per_rank = math.ceil(len(self.records) / world)
        mine = [
            (i, 1.0) if i < len(self.records) else (i % len(self.records), 0.0)
            for i in range(rank, per_rank * world, world)
        ]
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        trainer = self.trainer
        module = trainer.loss_module
        saved = getattr(module, "references", None)
        if self.references is not None:
            module.references = self.references
        trainer.wrapped.eval()
        collate = trainer.collate()
        sums: Dict[str, torch.Tensor] = {}
        errors, units = 0, 0
        try:
            for share in self.shares():
                batch = trainer.to_device(collate([self.dataset[(index, 0)] for index, _ in share]))
                weights = torch.tensor([w for _, w in share], device=trainer.device)
                with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
                    loss = trainer.wrapped(batch).float()
                self._add(sums, "eval/loss", loss * weights.sum())
                for name, value in getattr(module, "step_metrics", {}).items():
                    self._add(sums, f"eval/{name}", value.float() * weights.sum())
                self._add(sums, "count", weights.sum())
                if trainer.stage.loss == "speech" and not trainer.config.fsdp:
                    e, n = self._unit_errors(module, batch, weights)
                    errors, units = errors + e, units + n
        finally:
            trainer.wrapped.train()
            if self.references is not None:
                module.references = saved
        if trainer.stage.loss == "speech" and not trainer.config.fsdp:
            sums["unit_errors"] = torch.tensor(float(errors), device=trainer.device)
            sums["units"] = torch.tensor(float(units), device=trainer.device)
        totals = dict(zip(sums, trainer.reduce_sum(list(sums.values()))))
        count = totals.pop("count")
        out = {name: value / count for name, value in totals.items() if name.startswith("eval/")}
        if "units" in totals:
            out["eval/unit_error_rate"] = totals["unit_errors"] / max(totals["units"], 1.0)
        return out

    @staticmethod
    def _add(sums: Dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        sums[name] = value.detach() if name not in sums else sums[name] + value.detach()

    def _unit_errors(self, module, batch, weights) -> Tuple[int, int]:
        """Edit distance of the decoder's greedy units from each record's own, and the reference
        units counted (weight-0 padding left out)."""
        import jiwer

        states, tokens, mask = module.response_inputs(batch)
        decoded = self.trainer.model.speech_decoder.generate(states, tokens, mask, mask)
        errors = units = 0
        for row, hyp, weight in zip(batch["units"], decoded, weights.tolist()):
            if not weight:
                continue
            reference = [str(u) for u in row[row >= 0].tolist()]
            measures = jiwer.process_words(" ".join(reference), " ".join(map(str, hyp)) or "<empty>")
            errors += measures.substitutions + measures.deletions + measures.insertions
            units += len(reference)
        return errors, units
