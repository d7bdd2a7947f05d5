"""A trainer's run on disk: its checkpoints written (trainable weights, optimizer, schedule, step,
every rank's random generators, the reference values; see ``checkpoint.py``) and read back into
it, checked against the run first (``resume.py``)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import checkpoint, distributed, resume
from .checkpoint import CheckpointError
from .metrics import keep_metrics_until
from .step import TrainingDiverged


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights with NaN or infinite values, naming the first such tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingDiverged.of_weights(what, name)


def run_spec(trainer, allow_changes: bool = False) -> resume.RunSpec:
    """What a checkpoint must fit to be resumed by ``trainer``."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    factor = trainer.scheduler.lr_lambdas[0]
    groups = [
        {
            "name": g["name"],
            "params": [names[id(p)] for p in g["params"]],
            "initial_lr": g["initial_lr"],
            "weight_decay": g["weight_decay"],
            "betas": tuple(g["betas"]),
            "eps": g["eps"],
            "lr_at": (lambda step, base=g["initial_lr"]: base * factor(step)),
        }
        for g in trainer.optimizer.param_groups
    ]
    parameters = {n: (tuple(p.shape), p.dtype) for n, p in trainer.model.named_parameters() if p.requires_grad}
    return resume.RunSpec(
        parameters, groups, trainer.total_steps, trainer.world, trainer.rank, trainer.fingerprint(), allow_changes
    )


def checkpoint_dir(trainer, step: Optional[int] = None) -> Path:
    return trainer.out_dir / "checkpoints" / f"step-{trainer.step if step is None else step:08d}"


def save_checkpoint(trainer) -> None:
    """Trainable weights, optimizer and scheduler, step, the reference cache and every rank's
    random generators, gathered whole and written durably (see ``checkpoint.py``) by rank 0."""
    rng = distributed.gather_objects(checkpoint.rng_state(), trainer.world)
    weights = distributed.model_state(trainer.model, trainable_only=True)
    optimizer = distributed.optimizer_state(trainer.model, trainer.optimizer)
    if trainer.rank != 0:
        return
    check_finite(weights, f"step {trainer.step}'s trainable weights")
    tensors: Dict[str, torch.Tensor] = {}
    tie = {"checkpoint": uuid.uuid4().hex, "step": str(trainer.step)}  # stamped on every file of this checkpoint
    state = {
        "step": trainer.step,
        "world": trainer.world,
        "config": trainer.config.to_dict(),
        "checkpoint": tie["checkpoint"],
        "fingerprint": trainer.fingerprint(),
        "optimizer": checkpoint.split_tensors(optimizer, "optimizer", tensors),
        "scheduler": checkpoint.split_tensors(trainer.scheduler.state_dict(), "scheduler", tensors),
        "rng": [values for _, values in rng],
    }
    rng_tensors = {f"rank{r}.{key}": value for r, (ranked, _) in enumerate(rng) for key, value in ranked.items()}
    root = trainer.out_dir / "checkpoints"
    files = {
        "trainable.safetensors": (weights, tie),
        "optimizer.safetensors": (tensors, tie),
        "rng.safetensors": (rng_tensors, tie),
    }
    if trainer.references is not None and trainer.state_cache is None:  # computed by this run: kept with it
        values, metadata = trainer.references.tensors()
        files["reference.safetensors"] = (values, {**(metadata or {}), **tie})
    json_files = {"state.json": state}
    if trainer.best is not None:
        json_files["best.json"] = trainer.best
    checkpoint.write_checkpoint(checkpoint_dir(trainer), files, json_files)
    checkpoint.prune(root, trainer.config.keep, protect=protected(trainer))


def protected(trainer) -> List[str]:
    """The checkpoints pruning keeps whatever their age: the best one."""
    return [Path(trainer.best["checkpoint"]).name] if trainer.best is not None else []


def resume_run(trainer, allow_changes: bool = False, step: Optional[int] = None) -> Path:
    """Continue from the newest complete checkpoint (or, with ``step``, that step's: then the
    newer ones are set aside as ``*.superseded``, never removed). Nothing in it is unpickled; a
    file that cannot be read as written, was not written with its ``state.json``, or does not
    fit this run raises ``CheckpointError`` naming it, and a damaged newest checkpoint names
    the earlier steps ``--resume-from`` can take. A run whose options or data differ from the
    checkpoint's is refused, naming what changed, unless ``allow_changes`` (then the new
    options apply from the checkpoint's step on). Returns the checkpoint."""
    root = trainer.out_dir / "checkpoints"
    found_all = checkpoint.complete_checkpoints(root)
    if not found_all:
        raise FileNotFoundError(f"--resume: {root} holds no complete checkpoint")
    found = found_all[-1] if step is None else checkpoint_dir(trainer, step)
    if found not in found_all:
        raise FileNotFoundError(
            f"--resume-from {step}: {root} has no checkpoint of step {step}; its steps are "
            f"{[int(p.name[5:]) for p in found_all]}"
        )
    try:
        restored = resume.read_run_state(found, run_spec(trainer, allow_changes))
    except CheckpointError as error:
        earlier = [int(p.name[5:]) for p in found_all if p < found]
        if step is None and earlier:
            raise CheckpointError(
                f"{error}. The newest checkpoint cannot be resumed; earlier ones are at steps "
                f"{earlier}: --resume-from {earlier[-1]} continues from step {earlier[-1]} "
                f"(check first why the newest is damaged)"
            ) from None
        raise
    distributed.load_model_state(trainer.model, restored.weights)
    distributed.load_optimizer_state(trainer.model, trainer.optimizer, restored.optimizer)
    trainer.scheduler.load_state_dict(restored.scheduler)
    trainer.step = restored.step
    checkpoint.set_rng_state(restored.rng_tensors, restored.rng_values, found / "rng.safetensors")
    if restored.references and trainer.state_cache is None:
        trainer.references.update_from(restored.references)
    best = found / "best.json"
    trainer.best = checkpoint.read_json(best) if best.is_file() else None
    trainer._resumed = True
    distributed.barrier(trainer.world)
    if trainer.rank == 0:
        for newer in (p for p in found_all if p > found):  # the user chose an earlier step
            newer.rename(newer.with_name(newer.name + ".superseded"))
        # a kill inside the last save's removal would otherwise outlive a run with no save left
        checkpoint.prune(found.parent, trainer.config.keep, protect=protected(trainer))
        keep_metrics_until(trainer.out_dir / "metrics.jsonl", trainer.step)
    return found
