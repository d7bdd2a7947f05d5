"""One optimizer step and what it reports: the losses of its micro-batches (gradient
accumulation) under bf16 autocast where enabled, the gradient norm before clipping, the loss
module's own figures (CTC-DPO's rewards), all reduced across processes in one collective with one
read-back; a non-finite loss or gradient norm stops the run before the optimizer touches a weight
(:class:`TrainingDiverged`). Also the row each step logs: the names TRL and torchtitan users read,
and on CUDA the memory high-water marks and the model FLOPs utilisation."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .checkpoint import latest_checkpoint

# bf16 dense peak of the GPUs the MFU is given for (TFLOP/s); others report no MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the step was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint):
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        kept = f"the last checkpoint, {checkpoint}, is kept" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"step {step}: the loss is {loss} and the gradient norm {grad_norm}: training stopped before "
            f"the update ({kept}); lower --lr or check the data"
        )

    @classmethod
    def of_weights(cls, what: str, name: str) -> "TrainingDiverged":
        error = cls.__new__(cls)
        error.step, error.loss, error.grad_norm, error.checkpoint = None, None, None, None
        RuntimeError.__init__(error, f"{what}: {name} holds NaN or infinite values: not written")
        return error


def reduce_sum(values: List[torch.Tensor], world: int) -> List[float]:
    """Scalars summed over the processes, in one all-reduce and one read-back."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    if world > 1:
        torch.distributed.all_reduce(stacked)
    return stacked.tolist()


def run_step(trainer, batches: List[Dict[str, object]], stop: bool = False) -> Dict[str, float]:
    """The step (see the module docstring); the values are means over the processes, and
    ``stop`` is 1.0 if any process asked to stop."""
    sums: Dict[str, torch.Tensor] = {}
    module = trainer.loss_module
    for batch in batches:
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
            loss = trainer.wrapped(batch) / len(batches)
        loss.backward()
        _add(sums, "loss", loss)
        for name, value in getattr(module, "step_metrics", {}).items():
            _add(sums, name, value / len(batches))
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, trainer.config.max_grad_norm)
    sums["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    sums["stop"] = torch.tensor(float(stop), device=trainer.device)
    names = list(sums)
    values = {name: value / trainer.world for name, value in zip(names, reduce_sum(list(sums.values()), trainer.world))}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            trainer.step + 1, values["loss"], values["grad_norm"], latest_checkpoint(trainer.out_dir)
        )
    values["lr"] = trainer.optimizer.param_groups[0]["lr"]  # the rate this step uses
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    return values


def _add(sums: Dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = value.detach().float()
    sums[name] = value if name not in sums else sums[name] + value


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def step_row(trainer, values: Dict[str, float], tokens: int, waited: float, seconds: float) -> Dict[str, object]:
    """The metrics row of the step just taken (``metrics.py`` names them)."""
    row = {
        "step": trainer.step,
        "loss": values["loss"],
        "lr": values["lr"],
        "grad_norm": values["grad_norm"],
        "throughput(tps)": tokens * trainer.world / seconds,
        "data_loading(%)": 100.0 * waited / seconds,
        "step_s": seconds,
    }
    row.update({k: v for k, v in values.items() if k not in ("loss", "lr", "grad_norm", "stop")})
    if trainer.device.type == "cuda":
        row["memory/max_active(GiB)"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        row["memory/max_reserved(GiB)"] = torch.cuda.max_memory_reserved(trainer.device) / 2**30
        peak = peak_tflops(trainer.device)
        if peak is not None:
            row["mfu(%)"] = 100.0 * trainer.flops_per_token * tokens / seconds / (peak * 1e12)
    return row


def flops_per_token(model, trains) -> float:
    """Counted training FLOPs per LLM token: 6 per trained parameter (forward and backward) and 2
    per frozen one (forward only), attention's quadratic term left out, as torchtitan counts."""
    trained = {id(p) for name in trains for p in getattr(model, name).parameters()}
    return float(sum((6 if id(p) in trained else 2) * p.numel() for p in model.parameters()))
