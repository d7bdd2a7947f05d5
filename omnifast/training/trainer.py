"""One trainer for every stage: AdamW, warmup + cosine schedule, gradient accumulation and
clipping, bf16 autocast where supported, checkpoints that run no code and survive a kill or a
machine crash (``checkpoint.py``), ``--resume`` to the same weights bit for bit (every rank's
random generators are saved), and DistributedDataParallel (or FSDP2) under ``torchrun``.

Data order is a function of (seed, step) alone: each epoch is a seeded permutation cut into
global batches, and rank r takes the r-th slice of each. So a resumed run sees exactly the batches
the uninterrupted run would have, and N processes with batch b see what one process with batch
N x b sees.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from omnifast.models import OmniModel, OmniProcessor, response_states
from omnifast.ops._checks import check_known_keys

from . import checkpoint
from .checkpoint import CheckpointError
from .data import ConversationDataset, Record, collate_batch
from .stages import Stage, get_stage


@dataclass
class TrainConfig:
    stage: str
    lr: Optional[float] = None             # None: the stage's default
    warmup_ratio: Optional[float] = None
    epochs: Optional[int] = None
    batch_size: int = 2                    # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_steps: Optional[int] = None
    save_every: int = 50
    keep: int = 2                          # checkpoints kept
    seed: int = 0
    beta: float = 0.1                      # CTC-DPO temperature
    sft_weight: float = 0.0                # CTC-DPO: weight of the chosen units' CTC NLL (per unit) added
    bf16: str = "auto"                     # "auto": on CUDA devices that support it; "on" / "off"
    fsdp: bool = False                     # FSDP2 (fully_shard) instead of DDP under torchrun
    trains: Optional[Tuple[str, ...]] = None  # components to train instead of the stage's own
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Dict) -> "TrainConfig":
        check_known_keys("training option", values, cls)
        config = cls(**values)
        if isinstance(config.sft_weight, bool) or not isinstance(config.sft_weight, (int, float)) or config.sft_weight < 0:
            raise ValueError(f"sft_weight must be a number >= 0, got {config.sft_weight!r}")
        for name in ("batch_size", "grad_accum", "save_every", "keep"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if config.trains is not None:
            from omnifast.models.omni import COMPONENTS
            config.trains = tuple(config.trains.split(",") if isinstance(config.trains, str) else config.trains)
            unknown = [c for c in config.trains if c not in COMPONENTS]
            if unknown or not config.trains:
                raise ValueError(f"trains: unknown components {unknown}; the components are {', '.join(COMPONENTS)}")
        return config


def check_model_for_stage(model: OmniModel, stage: Stage, trains: Optional[Tuple[str, ...]] = None) -> None:
    for component in trains or stage.trains:
        if getattr(model, component, None) is None:
            raise ValueError(f"stage {stage.name!r} trains {component}, which this model does not have")
    if stage.loss == "dpo" and model.speech_decoder.mode != "nar":
        raise ValueError(f"stage {stage.name!r} needs a NAR (CTC) speech decoder, the model's is "
                         f"{model.speech_decoder.mode!r}")


def _distributed() -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _schedule(total: int, warmup_ratio: float):
    warmup = math.ceil(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (renamed from its temporary name, so never half-written)."""
    found = checkpoint.complete_checkpoints(out_dir / "checkpoints")
    return found[-1] if found else None


class Trainer:
    def __init__(self, model: OmniModel, processor: OmniProcessor, records: List[Record], config: TrainConfig,
                 out_dir, device: Optional[str] = None):
        self.stage = get_stage(config.stage)
        config = TrainConfig.from_dict(asdict(config))  # validated (and ``trains`` as a tuple)
        self.trains = config.trains or self.stage.trains
        check_model_for_stage(model, self.stage, self.trains)
        self.config, self.processor, self.out_dir = config, processor, Path(out_dir)
        self.rank, self.world = _distributed()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.model = model.to(self.device)
        self.model.freeze(except_=self.trains)
        self.dataset = ConversationDataset(records, processor)
        self.reference = None
        if self.stage.loss == "dpo":  # the frozen stage-4 decoder this stage starts from
            self.reference = copy.deepcopy(model.speech_decoder).requires_grad_(False).eval()
        lr = config.lr if config.lr is not None else self.stage.lr
        groups = []
        for component in self.trains:
            params = [p for p in getattr(model, component).parameters() if p.requires_grad]
            groups.append({"params": params, "lr": self.stage.component_lr.get(component, lr), "name": component})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        epochs = config.epochs if config.epochs is not None else self.stage.epochs
        self.global_batch = config.batch_size * self.world
        self.batches_per_epoch = math.ceil(len(self.dataset) / self.global_batch)
        total = math.ceil(epochs * self.batches_per_epoch / config.grad_accum)
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        warmup = config.warmup_ratio if config.warmup_ratio is not None else self.stage.warmup_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total_steps, warmup))
        self.step = 0
        self.wrapped = self._wrap()
        self.bf16 = config.bf16 == "on" or (config.bf16 == "auto" and self.device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())

    def _wrap(self):
        if self.world == 1:
            return self.model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard
            for component in self.trains:
                fully_shard(getattr(self.model, component))
            return self.model
        from torch.nn.parallel import DistributedDataParallel
        # batches without images leave the vision side unused: let DDP skip what got no gradient
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True)

    # ---- data -------------------------------------------------------------------------------
    def _batch(self, micro: int) -> Dict[str, object]:
        epoch, index = divmod(micro, self.batches_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        chunk = order[index * self.global_batch:(index + 1) * self.global_batch]
        mine = chunk[self.rank * self.config.batch_size:(self.rank + 1) * self.config.batch_size].tolist()
        batch = collate_batch([self.dataset[i] for i in mine], self.processor.tokenizer.pad_token_id)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- losses -----------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "speech_features")}
        if self.stage.loss == "text":
            return self.wrapped(**inputs).text_loss
        if self.stage.loss == "speech":
            return self.wrapped(**inputs, units=batch["units"], text_loss=False).speech_loss
        with torch.no_grad():
            hidden = self.model(**inputs, text_loss=False).hidden_states
        states, tokens, mask = response_states(hidden, batch["labels"])
        ref_chosen, ref_rejected = self._reference_logps(batch, states, tokens, mask)
        out = self.model.speech_decoder.dpo_loss(states, tokens, batch["units"], batch["rejected_units"], ref_chosen,
                                                 ref_rejected, beta=self.config.beta, hidden_mask=mask, text_mask=mask,
                                                 sft_weight=self.config.sft_weight)
        return out.loss

    def _reference_logps(self, batch, states, tokens, mask):
        """The frozen reference's log-likelihoods, computed once per record and cached."""
        cache = getattr(self, "_ref_cache", None)
        if cache is None:
            cache = self._ref_cache = {}
        missing = [i for i, rid in enumerate(batch["ids"]) if rid not in cache]
        if missing:
            chosen, rejected = self.reference.reference_logps(states, tokens, batch["units"], batch["rejected_units"],
                                                              hidden_mask=mask, text_mask=mask)
            for i in missing:
                cache[batch["ids"][i]] = (chosen[i].item(), rejected[i].item())
        values = torch.tensor([cache[rid] for rid in batch["ids"]], device=states.device, dtype=torch.float32)
        return values[:, 0], values[:, 1]

    # ---- checkpoints -------------------------------------------------------------------------
    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        """Trainable weights, optimizer and scheduler, step, the reference cache and every rank's
        random generators, written durably (see ``checkpoint.py``) by rank 0."""
        rng_tensors, rng_values = checkpoint.rng_state()
        ranks = [(rng_tensors, rng_values)]
        if self.world > 1:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, (rng_tensors, rng_values))
        if self.rank != 0:
            return
        optimizer_tensors: Dict[str, torch.Tensor] = {}
        state = {"step": self.step, "world": self.world, "config": asdict(self.config),
                 "optimizer": checkpoint.split_tensors(self.optimizer.state_dict(), "optimizer", optimizer_tensors),
                 "scheduler": checkpoint.split_tensors(self.scheduler.state_dict(), "scheduler", optimizer_tensors),
                 "ref_cache": getattr(self, "_ref_cache", None),
                 "rng": [values for _, values in ranks]}
        rng = {f"rank{r}.{key}": value for r, (tensors, _) in enumerate(ranks) for key, value in tensors.items()}
        root = self.out_dir / "checkpoints"
        checkpoint.write_checkpoint(root / f"step-{self.step:08d}",
                                    {"trainable.safetensors": self._trainable_state(),
                                     "optimizer.safetensors": optimizer_tensors, "rng.safetensors": rng},
                                    {"state.json": state})
        checkpoint.prune(root, self.config.keep)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint. Nothing in it is unpickled; a file that
        cannot be read as written raises ``CheckpointError`` naming it."""
        found = latest_checkpoint(self.out_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: {self.out_dir / 'checkpoints'} holds no complete checkpoint")
        state = checkpoint.read_json(found / "state.json")
        weights = checkpoint.read_tensors(found / "trainable.safetensors")
        optimizer_tensors = checkpoint.read_tensors(found / "optimizer.safetensors")
        rng = checkpoint.read_tensors(found / "rng.safetensors")
        try:
            if state["world"] != self.world:
                raise CheckpointError(f"{found / 'state.json'}: written by {state['world']} processes, resumed by "
                                      f"{self.world}")
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            where = found / "optimizer.safetensors"
            self.optimizer.load_state_dict(checkpoint.join_tensors(state["optimizer"], optimizer_tensors, where))
            self.scheduler.load_state_dict(checkpoint.join_tensors(state["scheduler"], optimizer_tensors, where))
            self.step = int(state["step"])
            mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{self.rank}.")}
            checkpoint.set_rng_state(mine, state["rng"][self.rank], found / "rng.safetensors")
            if state.get("ref_cache") is not None:
                self._ref_cache = {key: tuple(value) for key, value in state["ref_cache"].items()}
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{found}: does not match this run ({type(error).__name__}: {error})") from error
        self._resumed = True
        if self.rank == 0:  # a kill inside the last save's removal would otherwise outlive a run with no save left
            checkpoint.prune(found.parent, self.config.keep)
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.is_file() and self.rank == 0:  # drop what the interrupted run logged past the checkpoint
            kept = [json.dumps(r) for r in read_metrics(metrics) if r["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm.auto import tqdm
        if not getattr(self, "_resumed", False):  # a resumed run continues the saved generators
            torch.manual_seed(self.config.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.step == 0 and self.rank == 0 and metrics_path.exists():
            metrics_path.unlink()  # a fresh run
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {self.stage.index} {self.stage.name}",
                   disable=not self.config.progress or self.rank != 0)
        self.wrapped.train()
        while self.step < self.total_steps:
            start = time.perf_counter()
            batches = [self._batch(self.step * self.config.grad_accum + micro) for micro in range(self.config.grad_accum)]
            tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            loss_sum = self.train_step(batches)
            loss_value = self._mean_over_ranks(loss_sum)
            lr = self.scheduler.get_last_lr()[0]
            speed = tokens * self.world / (time.perf_counter() - start)
            if self.rank == 0:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps({"step": self.step, "loss": loss_value, "lr": lr, "tokens_per_s": speed}) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if self.step % self.config.save_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def train_step(self, batches: List[Dict[str, object]]) -> float:
        """One optimizer step over micro-batches (gradient accumulation): each loss under bf16
        autocast where enabled, backward, gradient clipping, optimizer and scheduler step. Returns
        this process's loss summed over the micro-batches (one read-back per step)."""
        loss_sum = None
        for batch in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self._loss(batch) / len(batches)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss_sum)

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world

    def finish(self) -> Path:
        """The stage's output: the whole model (the next stage starts from it) and a loss curve."""
        model_dir = self.out_dir / "model"
        if self.rank == 0:
            self.model.save_pretrained(model_dir, self.processor)
            plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", f"stage {self.stage.index}: {self.stage.name}")
        if self.world > 1:
            torch.distributed.barrier()
        return model_dir


def read_metrics(path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
