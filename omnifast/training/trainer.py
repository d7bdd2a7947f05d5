"""One trainer for every stage: the loop. AdamW, warmup + cosine schedule (``omnifast.schedule``),
gradient accumulation and clipping, bf16 autocast where supported, micro-batches from DataLoader
workers (``loader.py``), checkpoints that run no code and survive a kill or a machine crash
(``checkpoint.py``), ``--resume`` to the same weights bit for bit (every rank's random
generators are saved), and DDP or FSDP2 under ``torchrun`` (``distributed.py``)."""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from omnifast.models import OmniModel, OmniProcessor
from omnifast.ops import ReferenceLogpCache
from omnifast.schedule import warmup_cosine

from . import checkpoint, distributed, resume
from .config import TrainConfig
from .data import Record, data_fingerprint
from .loader import ConversationDataset, MicroBatches, TokenBudgetBatches, default_workers, make_loader, record_costs
from .cache import CachedDataset, StateCache, build_cache, collate_cached
from .cache import fingerprint as cache_fingerprint
from .layers import apply_layer_options
from .losses import CachedStageLoss, StageLoss
from .metrics import append_metrics, keep_metrics_until, plot_losses
from .stages import Stage, get_stage


def check_model_for_stage(model: OmniModel, stage: Stage, trains=None) -> None:
    for component in trains or stage.trains:
        if getattr(model, component, None) is None:
            raise ValueError(f"stage {stage.name!r} trains {component}, which this model does not have")


def tokens_in(batch: Dict[str, object]) -> int:
    """The real (unpadded) tokens of a micro-batch: LLM tokens, or the response states of a cached one."""
    for key in ("lengths", "attention_mask", "mask"):
        if batch.get(key) is not None:
            return int(batch[key].sum())
    return 0


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (renamed from its temporary name, so never half-written)."""
    found = checkpoint.complete_checkpoints(Path(out_dir) / "checkpoints")
    return found[-1] if found else None


class Trainer:
    """``Trainer(model, processor, records, config, out_dir).train()`` runs one stage and returns
    the directory of the saved model.

    ``state_cache`` (stages 4 and 5): a :class:`StateCache` of these records, or a folder where
    one is built if missing; then only the speech decoder goes to the device and each step reads
    the frozen front's states (and the reference's log-likelihoods) from the cache. ``loss``: a
    module ``forward(batch) -> scalar`` to train instead of the stage's own (``losses.StageLoss``),
    e.g. to time another recipe through the same step."""

    def __init__(self, model: OmniModel, processor: Optional[OmniProcessor], records: Sequence[Record],
                 config: TrainConfig, out_dir, device: Optional[str] = None, loss: Optional[torch.nn.Module] = None,
                 state_cache=None):
        config = TrainConfig.from_dict(config.to_dict())
        self.stage = get_stage(config.stage)
        self.trains = config.trains or self.stage.trains
        check_model_for_stage(model, self.stage, self.trains)
        self.config, self.processor, self.out_dir = config, processor, Path(out_dir)
        self.rank, self.world = distributed.init()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.bf16 = config.bf16 == "on" or (config.bf16 == "auto" and self.device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())
        self.model = model
        self.model.freeze(except_=self.trains)
        self.references = ReferenceLogpCache() if self.stage.loss == "dpo" else None
        self.state_cache = None
        if state_cache is not None:
            self.state_cache = self._open_cache(state_cache, records)
            model.speech_decoder.to(self.device)  # the frozen front stays where it is, off the device
            self.references = self.state_cache.references
            self.dataset = CachedDataset(records, self.state_cache, config.seed, config.speech_prob)
            self.loss_module = loss or CachedStageLoss(model.speech_decoder, self.stage, config.beta,
                                                       config.sft_weight, self.references, config.dpo_normalization)
        else:
            model.to(self.device)
            self.dataset = ConversationDataset(records, processor, config.seed, config.speech_prob) \
                if processor is not None else None
            reference = None
            if self.stage.loss == "dpo":  # the frozen stage-4 decoder this stage starts from
                reference = copy.deepcopy(model.speech_decoder).requires_grad_(False).eval()
            self.loss_module = loss or StageLoss(model, self.stage, config.beta, config.sft_weight, self.references,
                                                 reference, config.dpo_normalization)
        if model.speech_decoder is not None:
            model.speech_decoder.packing = config.packing
        apply_layer_options(model, self.trains, config.activation_checkpointing, config.compile)
        self.wrapped = distributed.wrap(self.loss_module, self.model, self.trains, self.world, config.fsdp,
                                        self.device, self.bf16)
        # after wrapping: FSDP2 replaces the parameters it shards
        lr = config.lr if config.lr is not None else self.stage.lr
        groups = []
        for component in self.trains:
            params = [p for p in getattr(self.model, component).parameters() if p.requires_grad]
            groups.append({"params": params, "lr": self.stage.component_lr.get(component, lr), "name": component})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        epochs = config.epochs if config.epochs is not None else self.stage.epochs
        self.costs = None
        if config.max_tokens is not None:
            factor = model.speech_decoder.config.upsample_factor if self.stage.loss in ("speech", "dpo") else None
            self.costs = record_costs(records, processor, factor)
        total = math.ceil(self.micro_batches(0).total(epochs) / config.grad_accum) if len(records) else 0
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        warmup = config.warmup_ratio if config.warmup_ratio is not None else self.stage.warmup_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, math.ceil(self.total_steps * warmup)))
        self.step = 0
        self.workers = config.workers if config.workers is not None else default_workers(self.device)
        self._resumed = False

    def _open_cache(self, state_cache, records) -> StateCache:
        if self.stage.loss not in ("speech", "dpo"):
            raise ValueError(f"state_cache serves the speech stages (speech-gen, emotion-dpo), not {self.stage.name!r}")
        if set(self.trains) != {"speech_decoder"}:
            raise ValueError(f"state_cache: the cached states are the frozen front's, but this run trains "
                             f"{', '.join(self.trains)}")
        if isinstance(state_cache, StateCache):
            expected = cache_fingerprint(self.model, self.processor, self.stage, records, self.bf16,
                                         self.config.dpo_normalization)
            return StateCache.open(state_cache.path, expected, records)
        return build_cache(state_cache, self.model, self.processor, records, self.stage, bf16=self.bf16,
                           device=self.device, progress=self.config.progress, rank=self.rank, world=self.world,
                           dpo_normalization=self.config.dpo_normalization)

    # ---- data -------------------------------------------------------------------------------
    def micro_batches(self, start: int, stop: Optional[int] = None) -> MicroBatches:
        """This rank's micro-batches ``start`` to ``stop``: ``batch_size`` records, or with
        ``max_tokens`` a token budget over length-bucketed records."""
        if self.costs is not None:
            return TokenBudgetBatches(self.costs, self.config.max_tokens, self.config.seed, self.rank, self.world,
                                      start, stop)
        return MicroBatches(len(self.dataset), self.config.batch_size, self.config.seed, self.rank, self.world,
                            start, stop)

    def to_device(self, batch: Dict[str, object]) -> Dict[str, object]:
        """A collated micro-batch with its tensors on the trainer's device."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ---- losses -----------------------------------------------------------------------------
    def loss(self, batch: Dict[str, object]) -> torch.Tensor:
        """This stage's loss on one micro-batch (the loss module's, through DDP or FSDP)."""
        return self.wrapped(batch)

    # ---- checkpoints -------------------------------------------------------------------------
    SHAPING_OPTIONS = ("lr", "warmup_ratio", "epochs", "batch_size", "grad_accum", "max_grad_norm", "weight_decay",
                       "max_steps", "seed", "beta", "sft_weight", "dpo_normalization", "speech_prob", "max_tokens",
                       "bf16", "fsdp", "trains")

    def fingerprint(self) -> Dict[str, object]:
        """What shapes this run: the stage, every option that changes its numbers, the data."""
        options = self.config.to_dict()
        out = {name: (list(options[name]) if isinstance(options[name], tuple) else options[name])
               for name in self.SHAPING_OPTIONS}
        out["stage"] = self.stage.name
        if not hasattr(self, "_data_fingerprint"):
            self._data_fingerprint = data_fingerprint(self.dataset.records) if self.dataset is not None else None
        out["data"] = self._data_fingerprint
        return out

    def run_spec(self, allow_changes: bool = False) -> resume.RunSpec:
        names = {id(p): n for n, p in self.model.named_parameters()}
        factor = self.scheduler.lr_lambdas[0]
        groups = [{"name": g["name"], "params": [names[id(p)] for p in g["params"]], "initial_lr": g["initial_lr"],
                   "weight_decay": g["weight_decay"], "betas": tuple(g["betas"]), "eps": g["eps"],
                   "lr_at": (lambda step, base=g["initial_lr"]: base * factor(step))}
                  for g in self.optimizer.param_groups]
        parameters = {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters() if p.requires_grad}
        return resume.RunSpec(parameters, groups, self.total_steps, self.world, self.rank, self.fingerprint(),
                                  allow_changes)

    def save_checkpoint(self) -> None:
        """Trainable weights, optimizer and scheduler, step, the reference cache and every rank's
        random generators, gathered whole and written durably (see ``checkpoint.py``) by rank 0."""
        rng = distributed.gather_objects(checkpoint.rng_state(), self.world)
        weights = distributed.model_state(self.model, trainable_only=True)
        optimizer = distributed.optimizer_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        tensors: Dict[str, torch.Tensor] = {}
        state = {"step": self.step, "world": self.world, "config": self.config.to_dict(),
                 "fingerprint": self.fingerprint(),
                 "optimizer": checkpoint.split_tensors(optimizer, "optimizer", tensors),
                 "scheduler": checkpoint.split_tensors(self.scheduler.state_dict(), "scheduler", tensors),
                 "rng": [values for _, values in rng]}
        rng_tensors = {f"rank{r}.{key}": value for r, (ranked, _) in enumerate(rng) for key, value in ranked.items()}
        root = self.out_dir / "checkpoints"
        files = {"trainable.safetensors": (weights, None), "optimizer.safetensors": (tensors, None),
                 "rng.safetensors": (rng_tensors, None)}
        if self.references is not None and self.state_cache is None:  # computed by this run: kept with it
            files["reference.safetensors"] = self.references.tensors()
        checkpoint.write_checkpoint(root / f"step-{self.step:08d}", files, {"state.json": state})
        checkpoint.prune(root, self.config.keep)

    def resume(self, allow_changes: bool = False) -> None:
        """Continue from the newest complete checkpoint. Nothing in it is unpickled; a file that
        cannot be read as written, or does not fit this run, raises ``CheckpointError`` naming it.
        A run whose options or data differ from the checkpoint's is refused, naming what changed,
        unless ``allow_changes`` (then the new options apply from the checkpoint's step on)."""
        found = latest_checkpoint(self.out_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: {self.out_dir / 'checkpoints'} holds no complete checkpoint")
        restored = resume.read_run_state(found, self.run_spec(allow_changes))
        distributed.load_model_state(self.model, restored.weights)
        distributed.load_optimizer_state(self.model, self.optimizer, restored.optimizer)
        self.scheduler.load_state_dict(restored.scheduler)
        self.step = restored.step
        checkpoint.set_rng_state(restored.rng_tensors, restored.rng_values, found / "rng.safetensors")
        if restored.references and self.state_cache is None:
            self.references.update_from(restored.references)
        self._resumed = True
        if self.rank == 0:  # a kill inside the last save's removal would otherwise outlive a run with no save left
            checkpoint.prune(found.parent, self.config.keep)
        if self.rank == 0:
            keep_metrics_until(self.out_dir / "metrics.jsonl", self.step)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm.auto import tqdm
        if not self._resumed:  # a resumed run continues the saved generators
            torch.manual_seed(self.config.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.step == 0 and self.rank == 0 and metrics_path.exists():
            metrics_path.unlink()  # a fresh run
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {self.stage.index} {self.stage.name}",
                   disable=not self.config.progress or self.rank != 0)
        self.wrapped.train()
        accum = self.config.grad_accum
        loader = make_loader(self.dataset, self.micro_batches(self.step * accum, self.total_steps * accum),
                             self.workers, self.device, collate_cached if self.state_cache is not None else None,
                             packed=self.config.packing)
        batches = iter(loader)
        self.data_wait_s = 0.0
        while self.step < self.total_steps:
            start = time.perf_counter()
            micro = []
            for _ in range(accum):
                micro.append(self.to_device(next(batches)))
            waited = time.perf_counter() - start
            self.data_wait_s += waited
            tokens = sum(tokens_in(batch) for batch in micro)
            loss_value = distributed.mean(self.train_step(micro), self.world, self.device)
            lr = self.scheduler.get_last_lr()[0]
            seconds = time.perf_counter() - start
            speed = tokens * self.world / seconds
            if self.rank == 0:
                append_metrics(metrics_path, {"step": self.step, "loss": loss_value, "lr": lr, "tokens_per_s": speed,
                                              "data_wait_s": waited, "step_s": seconds})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if self.step % self.config.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        del batches, loader
        return self.finish()

    def train_step(self, batches: List[Dict[str, object]]) -> float:
        """One optimizer step over micro-batches (gradient accumulation): each loss under bf16
        autocast where enabled, backward, gradient clipping, optimizer and scheduler step. Returns
        this process's loss summed over the micro-batches (one read-back per step)."""
        loss_sum = None
        for batch in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss(batch) / len(batches)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss_sum)

    def finish(self) -> Path:
        """The stage's output: the whole model (the next stage starts from it) and a loss curve."""
        model_dir = self.out_dir / "model"
        state = distributed.model_state(self.model, trainable_only=False) if self.world > 1 else None
        if self.rank == 0:
            self.model.save_pretrained(model_dir, self.processor, state_dict=state)
            if not plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png",
                               f"stage {self.stage.index}: {self.stage.name}"):
                print(f"{self.out_dir / 'loss.png'} not drawn: matplotlib is not installed", file=sys.stderr)
        distributed.barrier(self.world)
        return model_dir
