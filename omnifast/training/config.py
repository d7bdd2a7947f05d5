"""The options of a training run (``omnifast train --help`` lists them; ``--config`` reads them
from YAML or JSON), each checked for type, finiteness and range before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Tuple

from omnifast.ops.checks import check_known_keys

MAX_COUNT = 2**31 - 1  # counts past this overflow the kernels' 32-bit indices


@dataclass
class TrainConfig:
    stage: str
    lr: Optional[float] = None  # None: the stage's default
    warmup_ratio: Optional[float] = None  # share of the steps spent warming up, in [0, 1]
    epochs: Optional[int] = None
    batch_size: int = 2  # records per process and micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_steps: Optional[int] = None
    save_every: int = 50
    keep: int = 2  # checkpoints kept
    seed: int = 0
    beta: float = 0.1  # CTC-DPO temperature
    sft_weight: float = 0.0  # CTC-DPO: weight of the chosen units' CTC NLL (per unit) added
    dpo_normalization: str = "sum"  # DPO log-likelihoods: "sum", "length" or "openomni" (omnifast.ops.dpo)
    bf16: str = "auto"  # "auto": on CUDA devices that support it; "on" / "off"
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun
    trains: Optional[Tuple[str, ...]] = None  # components to train instead of the stage's own
    component_lr: Optional[Dict[str, float]] = None  # a learning rate per component (others: lr)
    speech_prob: float = 0.5  # records with spoken alternatives: the chance an epoch speaks them
    max_tokens: Optional[int] = None  # per process and micro-batch instead of batch_size: LLM tokens
    # (stages 1-3) or decoder frames (4-5), length-bucketed
    packing: bool = False  # records end to end, each attending within itself: no padding
    activation_checkpointing: str = "off"  # "selective": recompute the elementwise parts; "full": every layer
    compile: bool = False  # torch.compile each transformer block of what trains
    workers: Optional[int] = None  # DataLoader worker processes; None: 4 on CUDA, 0 on the CPU
    lora_r: Optional[int] = None  # LoRA rank for the LLM (stages that train it); None: no LoRA
    lora_alpha: float = 16.0  # LoRA scale: the update is (alpha / r) B A
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_save: str = "merged"  # "merged": adapters merged into the saved model; "adapters": beside it
    report_to: Tuple[str, ...] = ()  # metric sinks besides metrics.jsonl: tensorboard, wandb (offline)
    eval_every: Optional[int] = None  # optimizer steps between held-out evaluations (and one at the end)
    keep_best: Optional[str] = None  # keep the checkpoint best by this held-out metric, e.g. eval/loss
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Dict) -> "TrainConfig":
        check_known_keys("training option", values, cls)
        return cls(**values).validate()

    def to_dict(self) -> Dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        """Every option checked (TypeError for a wrong type, ValueError for a value out of range),
        naming the option; ``trains`` normalised to a tuple."""
        _number("lr", self.lr, optional=True, positive=True)
        _number("warmup_ratio", self.warmup_ratio, optional=True, low=0.0, high=1.0)
        _number("max_grad_norm", self.max_grad_norm, positive=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("beta", self.beta, positive=True)
        _number("sft_weight", self.sft_weight, low=0.0)
        _number("speech_prob", self.speech_prob, low=0.0, high=1.0)
        for name in ("epochs", "max_steps"):
            _integer(name, getattr(self, name), low=1, optional=True)
        for name in ("batch_size", "grad_accum", "save_every", "keep"):
            _integer(name, getattr(self, name), low=1, high=MAX_COUNT)
        _integer("seed", self.seed, low=0, high=2**63 - 1)
        _integer("workers", self.workers, low=0, optional=True)
        _integer("eval_every", self.eval_every, low=1, optional=True)
        _integer("lora_r", self.lora_r, low=1, high=MAX_COUNT, optional=True)
        _number("lora_alpha", self.lora_alpha, positive=True)
        _number("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        if (
            not isinstance(self.lora_targets, (list, tuple))
            or not self.lora_targets
            or not all(isinstance(t, str) for t in self.lora_targets)
        ):
            raise TypeError(f"lora_targets must be module names, comma-separated, got {self.lora_targets!r}")
        self.lora_targets = tuple(self.lora_targets)
        if self.lora_save not in ("merged", "adapters"):
            raise ValueError(f"lora_save must be merged or adapters, got {self.lora_save!r}")
        if isinstance(self.report_to, str):
            self.report_to = tuple(n.strip() for n in self.report_to.split(",") if n.strip() and n.strip() != "none")
        if not isinstance(self.report_to, (list, tuple)) or not all(isinstance(n, str) for n in self.report_to):
            raise TypeError(
                f"report_to must be a comma-separated string or a list of sink names, got {self.report_to!r}"
            )
        self.report_to = tuple(self.report_to)
        if self.keep_best is not None and (
            not isinstance(self.keep_best, str) or not self.keep_best.startswith("eval/")
        ):
            raise ValueError(
                f"keep_best must name a held-out metric (eval/loss, eval/unit_error_rate, "
                f"eval/rewards/accuracies, ...), got {self.keep_best!r}"
            )
        _integer("max_tokens", self.max_tokens, low=1, high=MAX_COUNT, optional=True)
        if self.activation_checkpointing not in ("off", "selective", "full"):
            raise ValueError(
                f"activation_checkpointing must be one of off, selective, full, got {self.activation_checkpointing!r}"
            )
        for name in ("fsdp", "progress", "packing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        from omnifast.ops.dpo import check_normalization

        try:
            check_normalization(self.dpo_normalization)
        except ValueError:
            raise ValueError(
                f"dpo_normalization must be one of sum, length, openomni, got {self.dpo_normalization!r}"
            ) from None
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be one of auto, on, off, got {self.bf16!r}")
        if self.component_lr is not None:
            self.component_lr = _component_rates(self.component_lr)
        if self.trains is not None:
            from omnifast.models.omni import COMPONENTS

            names = self.trains.split(",") if isinstance(self.trains, str) else self.trains
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise TypeError(
                    f"trains must be a comma-separated string or a list of component names, got {self.trains!r}"
                )
            self.trains = tuple(n.strip() for n in names)
            unknown = [c for c in self.trains if c not in COMPONENTS]
            if unknown or not self.trains:
                raise ValueError(f"trains: unknown components {unknown}; the components are {', '.join(COMPONENTS)}")
        return self


def _component_rates(value) -> Dict[str, float]:
    """``{"llm": 3e-4, ...}`` or ``"llm=3e-4,speech_projector=3e-3"`` -> a checked dict."""
    from omnifast.models.omni import COMPONENTS

    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"component_lr must be NAME=LR pairs separated by commas, got {value!r}")
        try:
            value = {name.strip(): float(rate) for name, rate in pairs}
        except ValueError:
            raise ValueError(f"component_lr: a learning rate is not a number in {value!r}") from None
    if not isinstance(value, dict) or not value:
        raise TypeError(f"component_lr must map component names to learning rates, got {value!r}")
    unknown = [name for name in value if name not in COMPONENTS]
    if unknown:
        raise ValueError(f"component_lr: unknown components {unknown}; the components are {', '.join(COMPONENTS)}")
    for name, rate in value.items():
        _number(f"component_lr[{name}]", rate, positive=True)
    return {name: float(rate) for name, rate in value.items()}


def _number(
    name: str,
    value,
    *,
    optional: bool = False,
    positive: bool = False,
    low: Optional[float] = None,
    high: Optional[float] = None,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be a number >= {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be a number <= {high:g}, got {value!r}")


def _integer(name: str, value, *, low: int, high: Optional[int] = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an integer <= {high}, got {value!r}")


def option_fields():
    """The options the CLI exposes (everything but ``stage``)."""
    return [f for f in fields(TrainConfig) if f.name != "stage"]
