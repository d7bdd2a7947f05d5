"""One trainer for every stage: the loop. AdamW, warmup + cosine schedule (``omnifast.schedule``),
gradient accumulation and clipping, bf16 autocast where supported (one step: ``step.py``),
micro-batches from DataLoader workers (``loader.py``), checkpoints that run no code and survive a
kill or a machine crash (``checkpoint.py``), ``--resume`` to the same weights bit for bit (every
rank's random generators are saved), DDP or FSDP2 under ``torchrun`` (``distributed.py``), the
metrics users of TRL and torchtitan read (``metrics.py``), evaluation during training
(``held_out.py``), and stops on a signal that lose nothing (``signals.py``)."""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from omnifast.models import OmniModel, OmniProcessor
from omnifast.schedule import warmup_cosine

from . import distributed, resume, run_state
from .block_options import apply_layer_options
from .cache import CachedDataset, StateCache, build_cache, collate_cached
from .cache import fingerprint as cache_fingerprint
from .config import TrainConfig
from .data import DataError, Record, data_fingerprint
from .held_out import HeldOut, better
from .loader import (
    ConversationDataset,
    MicroBatches,
    TokenBudgetBatches,
    default_workers,
    frame_costs,
    make_loader,
    record_costs,
    response_tokens,
    units_that_do_not_fit,
)
from .losses import CachedStageLoss, StageLoss
from .metrics import MetricsLog, check_report_to, plot_losses
from .references import ReferenceLogpCache
from .signals import TrainingStopped, stop_requests
from .stages import Stage, get_stage
from .step import TrainingDiverged, flops_per_token, reduce_sum, run_step, step_row

__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped", "check_model_for_stage"]


def check_model_for_stage(model: OmniModel, stage: Stage, trains=None) -> None:
    for component in trains or stage.trains:
        if getattr(model, component, None) is None:
            hint = " (build it with OmniConfig.speech_ctc=True)" if component == "speech_ctc_head" else ""
            raise ValueError(f"stage {stage.name!r} trains {component}, which this model does not have{hint}")


def tokens_in(batch: Dict[str, object]) -> int:
    """The real (unpadded) tokens of a micro-batch: LLM tokens, or the response states of a cached one."""
    for key in ("lengths", "attention_mask", "mask"):
        if batch.get(key) is not None:
            return int(batch[key].sum())
    return 0


class Trainer:
    """``Trainer(model, processor, records, config, out_dir).train()`` runs one stage and returns
    the directory of the saved model.

    ``state_cache`` (stages 4 and 5): a :class:`StateCache` of these records, or a folder where
    one is built if missing; then only the speech decoder goes to the device and each step reads
    the frozen front's states (and the reference's log-likelihoods) from the cache. ``loss``: a
    module ``forward(batch) -> scalar`` to train instead of the stage's own (``losses.StageLoss``),
    e.g. to time another recipe through the same step. ``eval_records``: held-out records evaluated
    every ``config.eval_every`` steps and at the end (``held_out.py``)."""

    def __init__(
        self,
        model: OmniModel,
        processor: Optional[OmniProcessor],
        records: Sequence[Record],
        config: TrainConfig,
        out_dir,
        device: Optional[str] = None,
        loss: Optional[torch.nn.Module] = None,
        state_cache=None,
        eval_records: Optional[Sequence[Record]] = None,
    ):
        config = TrainConfig.from_dict(config.to_dict())
        self.stage = get_stage(config.stage)
        self.trains = config.trains or self.stage.trains
        check_model_for_stage(model, self.stage, self.trains)
        if config.packing and self.stage.loss == "ctc":
            raise ValueError(f"packing: stage {self.stage.name!r} runs no LLM, so there is nothing to pack")
        self.config, self.processor, self.out_dir = config, processor, Path(out_dir)
        self.rank, self.world = distributed.init()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.bf16 = config.bf16 == "on" or (
            config.bf16 == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.model = model
        self.model.freeze(except_=self.trains)
        if config.lora_r is not None:
            if "llm" not in self.trains:
                raise ValueError(
                    f"lora_r: LoRA adapts the LLM, which stage {self.stage.name!r} does not train "
                    f"(it trains {', '.join(self.trains)})"
                )
            from .lora import add_adapters

            torch.manual_seed(config.seed)
            add_adapters(model.llm, config)
        self.references = ReferenceLogpCache() if self.stage.loss == "dpo" else None
        self.state_cache = None
        if state_cache is not None:
            self.state_cache = self._open_cache(state_cache, records)
            model.speech_decoder.to(self.device)  # the frozen front stays where it is, off the device
            self.references = self.state_cache.references
            self.dataset = CachedDataset(records, self.state_cache, config.seed, config.speech_prob)
            self.loss_module = loss or CachedStageLoss(
                model.speech_decoder,
                self.stage,
                config.beta,
                config.sft_weight,
                self.references,
                config.dpo_normalization,
            )
        else:
            model.to(self.device)
            self.dataset = (
                ConversationDataset(records, processor, config.seed, config.speech_prob)
                if processor is not None
                else None
            )
            reference = None
            if self.stage.loss == "dpo":  # the frozen stage-4 decoder this stage starts from
                reference = copy.deepcopy(model.speech_decoder).requires_grad_(False).eval()
            special = processor.tokenizer.all_special_ids if processor is not None else ()
            self.loss_module = loss or StageLoss(
                model,
                self.stage,
                config.beta,
                config.sft_weight,
                self.references,
                reference,
                config.dpo_normalization,
                special,
            )
        if model.speech_decoder is not None:
            model.speech_decoder.packing = config.packing
        apply_layer_options(model, self.trains, config.activation_checkpointing, config.compile)
        self.wrapped = distributed.wrap(
            self.loss_module,
            self.model,
            self.trains,
            self.world,
            config.fsdp,
            self.device,
            self.bf16,
            distributed.may_leave_unused(self.trains, records),
        )
        # after wrapping: FSDP2 replaces the parameters it shards
        lr = config.lr if config.lr is not None else self.stage.lr
        groups = []
        for component in self.trains:
            params = [p for p in getattr(self.model, component).parameters() if p.requires_grad]
            rates = {**self.stage.component_lr, **(config.component_lr or {})}
            groups.append({"params": params, "lr": rates.get(component, lr), "name": component})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        epochs = config.epochs if config.epochs is not None else self.stage.epochs
        speech = self.stage.loss in ("speech", "dpo")
        responses = response_tokens(records, processor) if speech and processor is not None else None
        self.costs = None
        if config.max_tokens is not None:
            factor = model.speech_decoder.config.upsample_factor if speech else None
            self.costs = frame_costs(records, responses, factor) if speech else record_costs(records, processor)
        if responses is not None:
            self._check_units_fit(model, records, responses)
        cap = None if config.max_steps is None else config.max_steps * config.grad_accum
        micro_total = self.micro_batches(0).total(epochs, cap) if len(records) else 0
        if len(records) and config.grad_accum > micro_total:
            raise ValueError(
                f"grad_accum={config.grad_accum}: the run has only {micro_total} micro-batches, not "
                f"enough for one optimizer step"
            )
        total = math.ceil(micro_total / config.grad_accum)
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        warmup = config.warmup_ratio if config.warmup_ratio is not None else self.stage.warmup_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, math.ceil(self.total_steps * warmup))
        )
        self.step = 0
        self.workers = config.workers if config.workers is not None else default_workers(self.device)
        if self.workers > (os.cpu_count() or 1):
            raise ValueError(f"workers={self.workers}: this machine has {os.cpu_count()} CPUs")
        self._resumed = False
        self.flops_per_token = flops_per_token(model, self.trains) if self.device.type == "cuda" else 0.0
        check_report_to(config.report_to)
        self.held_out = None
        if eval_records is not None:
            cache_dir = None if self.state_cache is None else Path(str(self.state_cache.path) + "-eval")
            self.held_out = HeldOut(self, eval_records, cache_dir)
        elif config.eval_every is not None or config.keep_best is not None:
            raise ValueError("eval_every and keep_best need held-out records (--eval-data)")
        self.best: Optional[Dict[str, object]] = None

    def _check_units_fit(self, model, records, responses) -> None:
        """Before step 1: unit sequences no CTC path fits are refused for CTC-DPO (their reference
        log-likelihood would be -inf) and for a decoder without ``zero_infinity``; with it (OpenOmni's
        setting) stage 4 trains on, each such record's loss zero, and says which they are."""
        decoder = model.speech_decoder
        if decoder is None or decoder.mode != "nar":
            return
        shared = self.config.dpo_normalization != "openomni"
        problems = units_that_do_not_fit(records, responses, decoder.config.upsample_factor, shared)
        if not problems:
            return
        listed = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        if self.stage.loss == "dpo" or not decoder.config.zero_infinity:
            raise DataError(f"{len(problems)} record(s) with units no CTC path fits:\n{listed}")
        warnings.warn(
            f"{len(problems)} record(s) have units no CTC path fits; their loss is zero (zero_infinity):\n{listed}",
            stacklevel=3,
        )

    def _open_cache(self, state_cache, records) -> StateCache:
        if self.stage.loss not in ("speech", "dpo"):
            raise ValueError(f"state_cache serves the speech stages (speech-gen, emotion-dpo), not {self.stage.name!r}")
        if set(self.trains) != {"speech_decoder"}:
            raise ValueError(
                f"state_cache: the cached states are the frozen front's, but this run trains {', '.join(self.trains)}"
            )
        if isinstance(state_cache, StateCache):
            expected = cache_fingerprint(
                self.model, self.processor, self.stage, records, self.bf16, self.config.dpo_normalization
            )
            return StateCache.open(state_cache.path, expected, records)
        return build_cache(
            state_cache,
            self.model,
            self.processor,
            records,
            self.stage,
            bf16=self.bf16,
            device=self.device,
            progress=self.config.progress,
            rank=self.rank,
            world=self.world,
            dpo_normalization=self.config.dpo_normalization,
        )

    # ---- data -------------------------------------------------------------------------------
    def micro_batches(self, start: int, stop: Optional[int] = None) -> MicroBatches:
        """This rank's micro-batches ``start`` to ``stop``: ``batch_size`` records, or with
        ``max_tokens`` a token budget over length-bucketed records."""
        if self.costs is not None:
            return TokenBudgetBatches(
                self.costs, self.config.max_tokens, self.config.seed, self.rank, self.world, start, stop
            )
        return MicroBatches(
            len(self.dataset), self.config.batch_size, self.config.seed, self.rank, self.world, start, stop
        )

    def collate(self):
        """The collate function of this run's micro-batches."""
        if self.state_cache is not None:
            return collate_cached
        from .loader import _Collate

        return _Collate(self.processor.tokenizer.pad_token_id, self.config.packing)

    def reduce_sum(self, values) -> List[float]:
        return reduce_sum(values, self.world)

    def to_device(self, batch: Dict[str, object]) -> Dict[str, object]:
        """A collated micro-batch with its tensors on the trainer's device."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- losses -----------------------------------------------------------------------------
    def loss(self, batch: Dict[str, object]) -> torch.Tensor:
        """This stage's loss on one micro-batch (the loss module's, through DDP or FSDP)."""
        return self.wrapped(batch)

    # ---- checkpoints -------------------------------------------------------------------------
    SHAPING_OPTIONS = (
        "lr",
        "warmup_ratio",
        "epochs",
        "batch_size",
        "grad_accum",
        "max_grad_norm",
        "weight_decay",
        "max_steps",
        "seed",
        "beta",
        "sft_weight",
        "dpo_normalization",
        "speech_prob",
        "max_tokens",
        "bf16",
        "fsdp",
        "trains",
        "component_lr",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
    )

    def fingerprint(self) -> Dict[str, object]:
        """What shapes this run: the stage, every option that changes its numbers, the data."""
        options = self.config.to_dict()
        out = {
            name: (list(options[name]) if isinstance(options[name], tuple) else options[name])
            for name in self.SHAPING_OPTIONS
        }
        out["stage"] = self.stage.name
        if not hasattr(self, "_data_fingerprint"):
            self._data_fingerprint = data_fingerprint(self.dataset.records) if self.dataset is not None else None
        out["data"] = self._data_fingerprint
        return out

    def run_spec(self, allow_changes: bool = False) -> resume.RunSpec:
        return run_state.run_spec(self, allow_changes)

    def checkpoint_dir(self, step: Optional[int] = None) -> Path:
        return run_state.checkpoint_dir(self, step)

    def save_checkpoint(self) -> None:
        """Trainable weights, optimizer and scheduler, step, the reference cache and every rank's
        random generators, gathered whole and written durably by rank 0 (``run_state.py``)."""
        run_state.save_checkpoint(self)

    def resume(self, allow_changes: bool = False, step: Optional[int] = None) -> Path:
        """Continue from the newest complete checkpoint, or ``step``'s: ``run_state.resume_run``."""
        return run_state.resume_run(self, allow_changes, step)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run the stage to its last step and save the model (``finish``). A signal stops it after
        a whole step with a checkpoint (:class:`TrainingStopped`); a non-finite loss or gradient
        norm before the update (:class:`TrainingDiverged`)."""
        from tqdm.auto import tqdm

        if not self._resumed:  # a resumed run continues the saved generators
            torch.manual_seed(self.config.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.step == 0 and self.rank == 0 and metrics_path.exists():
            metrics_path.unlink()  # a fresh run
        log = (
            MetricsLog(
                self.out_dir,
                self.config.report_to,
                f"{self.stage.index}-{self.stage.name}",
                self.config.to_dict(),
                self.step,
            )
            if self.rank == 0
            else None
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"stage {self.stage.index} {self.stage.name}",
            disable=not self.config.progress or self.rank != 0,
        )
        self.wrapped.train()
        accum = self.config.grad_accum
        loader = make_loader(
            self.dataset,
            self.micro_batches(self.step * accum, self.total_steps * accum),
            self.workers,
            self.device,
            collate_cached if self.state_cache is not None else None,
            packed=self.config.packing,
        )
        batches = iter(loader)
        self.data_wait_s = 0.0
        try:
            with stop_requests() as stops:
                while self.step < self.total_steps:
                    start = time.perf_counter()
                    micro = [self.to_device(next(batches)) for _ in range(accum)]
                    waited = time.perf_counter() - start
                    self.data_wait_s += waited
                    tokens = sum(tokens_in(batch) for batch in micro)
                    values = run_step(self, micro, stop=stops.received is not None)
                    row = step_row(self, values, tokens, waited, time.perf_counter() - start)
                    evaluate = self.held_out is not None and (
                        self.step == self.total_steps
                        or (self.config.eval_every is not None and self.step % self.config.eval_every == 0)
                    )
                    if evaluate:
                        row.update(self.held_out.evaluate())
                    if log is not None:
                        log.log(row)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    bar.update(1)
                    saved = self._after_step(row, evaluate)
                    if values["stop"] > 0:
                        if not saved:
                            self.save_checkpoint()
                        raise TrainingStopped(stops.received or "SIGTERM", self.step, self.checkpoint_dir())
        finally:
            bar.close()
            if log is not None:
                log.close()
            del batches, loader
        return self.finish()

    def _after_step(self, row: Dict[str, object], evaluated: bool) -> bool:
        """A checkpoint when one is due (or the held-out metric ``keep_best`` names improved);
        whether one was written."""
        due = self.step % self.config.save_every == 0 or self.step == self.total_steps
        if evaluated and self.config.keep_best is not None:
            metric = self.config.keep_best
            if metric not in row:
                raise ValueError(
                    f"keep_best: the evaluation has no {metric!r}; it has "
                    f"{sorted(k for k in row if k.startswith('eval/'))}"
                )
            if better(metric, row[metric], None if self.best is None else self.best["value"]):
                self.best = {
                    "metric": metric,
                    "value": row[metric],
                    "step": self.step,
                    "checkpoint": str(self.checkpoint_dir()),
                }
                due = True
        if due:
            self.save_checkpoint()
        return due

    def train_step(self, batches: List[Dict[str, object]]) -> Dict[str, float]:
        """One optimizer step over micro-batches (``step.py``); returns its metrics (means over
        the processes): loss, grad_norm, lr and the loss module's own."""
        return run_step(self, batches)

    def _finish_adapters(self, model_dir: Path) -> None:
        """Merge the LoRA adapters into the LLM (or save them beside the model, and the LLM as
        it was) before the model is saved."""
        from . import lora

        if self.config.lora_save == "adapters":
            if self.rank == 0:
                lora.save_adapters(self.model.llm, self.config, model_dir / "adapters")
            lora.drop_adapters(self.model.llm)
        else:
            lora.merge_adapters(self.model.llm)

    def finish(self) -> Path:
        """The stage's output: the whole model (the next stage starts from it) and a loss curve."""
        model_dir = self.out_dir / "model"
        if self.config.lora_r is not None:
            self._finish_adapters(model_dir)
        state = distributed.model_state(self.model, trainable_only=False) if self.world > 1 else None
        if self.rank == 0:
            run_state.check_finite(state if state is not None else self.model.state_dict(), "the model")
            self.model.save_pretrained(model_dir, self.processor, state_dict=state)
            if not plot_losses(
                self.out_dir / "metrics.jsonl",
                self.out_dir / "loss.png",
                f"stage {self.stage.index}: {self.stage.name}",
            ):
                print(f"{self.out_dir / 'loss.png'} not drawn: matplotlib is not installed", file=sys.stderr)
        distributed.barrier(self.world)
        return model_dir
