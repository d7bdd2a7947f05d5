"""``omnifast train`` and ``omnifast eval``: argument handling, every check before the first
step, and the chaining of stages (each starts from the previous stage's ``model`` directory)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch

from omnifast.durable import write_json
from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.models.omni import CONFIG_NAME

from .checkpoint import latest_checkpoint
from .config import TrainConfig, option_fields
from .data import RecordFile, load_records
from .stages import BY_NAME, STAGES, Stage, get_stage
from .trainer import Trainer, check_model_for_stage

PRESETS = {"tiny": OmniConfig.tiny, "small": OmniConfig.small}  # fresh models with the byte-level tokenizer


def load_model(spec: str, seed: int = 0) -> Tuple[OmniModel, OmniProcessor]:
    """A named size (``tiny``: a few million parameters; ``small``: OpenOmni's structure at
    CPU size; fresh weights and the byte-level tokenizer) or a save_pretrained directory."""
    if spec in PRESETS:
        torch.manual_seed(seed)
        config = PRESETS[spec]()
        return OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)
    path = Path(spec)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(
            f"--model must be one of {', '.join(PRESETS)} or a directory written by "
            f"OmniModel.save_pretrained; {path} has no {CONFIG_NAME}"
        )
    model = OmniModel.from_pretrained(path)
    return model, OmniProcessor.from_pretrained(path, model.config)


def records_for(model: OmniModel, path, stage: Stage, media_roots=()) -> RecordFile:
    """A data file validated for ``stage`` and this model: its unit vocabulary, its speech window
    and its sampling rate (for the length of ``.npy`` clips), its LLM's and speech decoder's
    positions."""
    config = model.config
    decoder = config.decoder_config()
    return load_records(
        path,
        stage,
        None if decoder is None else decoder.units,
        media_roots=media_roots,
        audio_seconds=config.audio_seconds,
        sampling_rate=config.sampling_rate,
        max_units=None if decoder is None else decoder.max_positions,
        max_positions=config.llm.get("max_position_embeddings"),
    )


def _read_config_file(path) -> Dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
    else:
        values = json.loads(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of training options")
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", choices=list(BY_NAME), help="the stage to run")
    which.add_argument(
        "--all",
        action="store_true",
        help="run the five stages in order (--data: a folder of <stage>.json files; each stage writes OUT/<n>-<stage>)",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="a named size (tiny, small) or a directory written by save_pretrained (default: tiny)",
    )
    parser.add_argument("--data", required=True, help="the stage's JSON file (a folder with --all)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default=None, help="JSON or YAML file of training options (below)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument(
        "--allow-changed-run",
        action="store_true",
        help="with --resume: continue even though options or data differ from the checkpoint's "
        "(the new ones apply from its step on)",
    )
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder media paths may point into besides the data file's own (repeatable)",
    )
    parser.add_argument(
        "--state-cache",
        default=None,
        metavar="DIR",
        help="speech stages: train from the frozen front's states cached in DIR (built there when "
        "missing; with --all, one folder per speech stage inside it)",
    )
    parser.add_argument(
        "--resume-from",
        type=int,
        default=None,
        metavar="STEP",
        help="continue from the checkpoint of optimizer step STEP (when the newest is damaged); "
        "newer checkpoints are set aside as *.superseded",
    )
    parser.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="held-out records in the stage's format: evaluated every --eval-every steps and at the "
        "end, logged as eval/... (with --all: a folder of <stage>.json files)",
    )
    defaults = TrainConfig(stage="s2t")
    kinds = {
        "trains": str,
        "component_lr": str,
        "lr": float,
        "warmup_ratio": float,
        "max_grad_norm": float,
        "weight_decay": float,
        "beta": float,
        "sft_weight": float,
        "speech_prob": float,
        "bf16": str,
        "activation_checkpointing": str,
        "dpo_normalization": str,
        "report_to": str,
        "keep_best": str,
        "lora_alpha": float,
        "lora_dropout": float,
        "lora_targets": str,
        "lora_save": str,
    }
    choices = {
        "bf16": ("auto", "on", "off"),
        "activation_checkpointing": ("off", "selective", "full"),
        "dpo_normalization": ("sum", "length", "openomni"),
        "lora_save": ("merged", "adapters"),
    }
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        default = {
            "max_steps": "all epochs",
            "workers": "4 on CUDA, 0 on the CPU",
            "max_tokens": "--batch-size records",
            "report_to": "metrics.jsonl only",
            "eval_every": "only at the end",
            "keep_best": "off",
            "trains": "the stage's components",
            "component_lr": "--lr for all",
            "lora_r": "off",
            "lora_targets": "every attention and MLP projection",
        }.get(f.name)
        if default is None:
            default = "the stage's" if value is None else value
        what = OPTION_HELP[f.name]
        if isinstance(value, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"{what} (default: {default})"
            )
        else:
            parser.add_argument(
                flag,
                type=kinds.get(f.name, int),
                default=None,
                choices=choices.get(f.name),
                help=f"{what} (default: {default})",
            )


OPTION_HELP = {
    "lr": "peak learning rate of AdamW (per optimizer step)",
    "warmup_ratio": "share of the optimizer steps spent warming up linearly, in [0, 1]; cosine decay after",
    "epochs": "passes over the data",
    "batch_size": "records per process and micro-batch",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "max_grad_norm": "clip the gradient's global L2 norm to this before each update",
    "weight_decay": "AdamW's decoupled weight decay",
    "max_steps": "stop after this many optimizer steps",
    "save_every": "optimizer steps between checkpoints (one is also written at the end)",
    "keep": "checkpoints kept (the newest; and the best with --keep-best)",
    "seed": "seed of the weights of a fresh model, the data order and dropout",
    "beta": "CTC-DPO's temperature",
    "sft_weight": "CTC-DPO: weight of the chosen units' CTC negative log-likelihood (per unit) added to the loss",
    "dpo_normalization": "CTC-DPO: how a sequence's log-likelihood is normalised (sum, per unit, or OpenOmni's "
    "per batch)",
    "bf16": "bf16 autocast: auto = on CUDA devices that support it",
    "fsdp": "shard what trains with FSDP2 instead of DDP (needs torchrun with more than one process)",
    "trains": "comma-separated components to train instead of the stage's (llm, vision, speech, image_projector, "
    "speech_projector, speech_decoder, speech_ctc_head)",
    "component_lr": "learning rates per component, NAME=LR[,NAME=LR] (the others train at --lr)",
    "speech_prob": "records with spoken alternatives: the chance an epoch presents a record's questions spoken",
    "max_tokens": "per process and micro-batch instead of --batch-size: LLM tokens (prompt + answer, media "
    "placeholders included) in stages 0-3, decoder frames (upsampled answer tokens or units, the "
    "longer) in stages 4-5; records are bucketed by length",
    "packing": "put a micro-batch's records end to end (each attends within itself): no padding",
    "activation_checkpointing": "recompute activations in the backward: selective = the elementwise parts, full = "
    "every transformer layer",
    "compile": "torch.compile each transformer block of what trains",
    "workers": "DataLoader worker processes that build micro-batches ahead of the step",
    "report_to": "comma-separated metric sinks besides metrics.jsonl: tensorboard (OUT/runs), wandb (offline, "
    "OUT/wandb)",
    "eval_every": "optimizer steps between held-out evaluations of --eval-data",
    "keep_best": "keep the checkpoint best by this held-out metric (eval/loss, eval/unit_error_rate, "
    "eval/rewards/accuracies, ...) besides the newest",
    "progress": "show a progress bar",
    "lora_r": "train rank-r LoRA adapters in the LLM instead of its weights (stages that train the llm)",
    "lora_alpha": "LoRA's scale: the update added to a weight is (alpha / r) B A",
    "lora_dropout": "dropout on the LoRA adapters' input",
    "lora_targets": "comma-separated names of the LLM's linear layers that get adapters",
    "lora_save": "merged: the adapters merged into the saved model; adapters: the LLM saved as it was and the "
    "adapters in peft's layout in OUT/model/adapters",
}


def _options(args) -> Dict:
    options = _read_config_file(args.config)
    for f in option_fields():
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    return options


def check_train_arguments(args, options: Dict) -> None:
    """Options that cannot apply to this run are refused by name (never ignored)."""
    resuming = args.resume or args.resume_from is not None
    if args.allow_changed_run and not resuming:
        raise ValueError("--allow-changed-run applies to a resumed run: pass --resume (or --resume-from STEP) too")
    if args.resume_from is not None and args.resume_from < 0:
        raise ValueError(f"--resume-from must be a step >= 0, got {args.resume_from}")
    if options.get("fsdp") and int(__import__("os").environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(
            "--fsdp shards across processes: run under torchrun with more than one process "
            "(in one process there is nothing to shard)"
        )
    if (options.get("eval_every") is not None or options.get("keep_best") is not None) and args.eval_data is None:
        raise ValueError("--eval-every and --keep-best evaluate held-out records: pass --eval-data FILE")


def check_trains_have_media(records, stage: Stage, trains) -> None:
    """A media encoder trained on a stage whose records never feed it would get no gradient."""
    for media, components in (("images", ("vision", "image_projector")), ("speech", ("speech", "speech_projector"))):
        named = [c for c in components if c in (trains or ())]
        if named and not records.count_with(media):
            raise ValueError(
                f"--trains {','.join(named)}: no record of stage {stage.name!r} has {media}, so "
                f"{' and '.join(named)} would get no gradient"
            )


def train_command(args) -> int:
    stages = list(STAGES) if args.all else [get_stage(args.stage)]
    options = _options(args)
    TrainConfig.from_dict({**options, "stage": stages[0].name})  # unknown options fail here
    check_train_arguments(args, options)
    data = Path(args.data)
    files = {s.name: (data / f"{s.name}.json" if args.all else data) for s in stages}
    eval_files = (
        {s.name: (Path(args.eval_data) / f"{s.name}.json" if args.all else Path(args.eval_data)) for s in stages}
        if args.eval_data
        else {}
    )
    out_dirs = {s.name: (Path(args.out) / f"{s.index}-{s.name}" if args.all else Path(args.out)) for s in stages}
    model, processor = load_model(args.model, options.get("seed", 0))
    records = {
        s.name: records_for(model, files[s.name], s, args.media_root) for s in stages
    }  # every data error, up front
    held_out = {
        s.name: records_for(model, eval_files[s.name], s, args.media_root) for s in stages if s.name in eval_files
    }
    check_model_for_stage(model, stages[0])
    for stage in stages:
        check_trains_have_media(records[stage.name], stage, options.get("trains"))
    resuming = args.resume or args.resume_from is not None
    if resuming and not args.all and latest_checkpoint(out_dirs[stages[0].name]) is None:
        raise FileNotFoundError(f"--resume: {out_dirs[stages[0].name] / 'checkpoints'} holds no complete checkpoint")
    for stage in stages:
        out = out_dirs[stage.name]
        if args.all and resuming and (out / "model" / CONFIG_NAME).is_file():
            model_dir, model = out / "model", None  # finished before the interruption
            continue
        if model is None:  # each stage starts from the previous stage's output
            model, processor = load_model(str(model_dir))
        cache = None
        if args.state_cache and stage.loss in ("speech", "dpo"):
            cache = Path(args.state_cache) / stage.name if args.all else Path(args.state_cache)
        elif args.state_cache and not args.all:
            raise ValueError(f"--state-cache serves the speech stages (speech-gen, emotion-dpo), not {stage.name!r}")
        trainer = Trainer(
            model,
            processor,
            records[stage.name],
            TrainConfig.from_dict({**options, "stage": stage.name}),
            out,
            state_cache=cache,
            eval_records=held_out.get(stage.name),
        )
        if resuming and latest_checkpoint(out) is not None:
            found = trainer.resume(allow_changes=args.allow_changed_run, step=args.resume_from)
            print(f"resuming {stage.name} from {found} (step {trainer.step} of {trainer.total_steps})", file=sys.stderr)
        model_dir, model = trainer.train(), None
        print(f"{stage.name}: the model is in {model_dir}; {final_metrics(out / 'metrics.jsonl')}", file=sys.stderr)
    return 0


def final_metrics(path: Path) -> str:
    """The last step's figures, as one line."""
    from .metrics import read_metrics

    rows = read_metrics(path) if path.is_file() else []
    if not rows:
        return "no steps were run"
    last = rows[-1]
    shown = {k: v for k, v in last.items() if k in ("step", "loss", "grad_norm") or k.startswith(("eval/", "rewards/"))}
    return "final " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=list(BY_NAME), required=True)
    parser.add_argument(
        "--model", required=True, help="a directory written by save_pretrained (or a named size: tiny, small)"
    )
    parser.add_argument("--data", required=True, help="held-out records in the stage's JSON format")
    parser.add_argument("--reference", default=None, help="emotion-dpo: the reference (stage-4) model directory")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder media paths may point into besides the data file's own (repeatable)",
    )


def eval_command(args) -> int:
    from .evaluate import UNITS, describe, evaluate

    stage = get_stage(args.stage)
    model, processor = load_model(args.model)
    records = records_for(model, args.data, stage, args.media_root)
    reference = load_model(args.reference)[0] if args.reference else None
    metrics = evaluate(stage.name, model, processor, records, reference)
    print(describe(metrics))
    if args.out:
        write_json(args.out, {**metrics, "units": {k: UNITS.get(k, "") for k in metrics}}, indent=2)
    return 0


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=["speech-gen", "emotion-dpo"], required=True)
    parser.add_argument(
        "--model",
        default="tiny",
        help="a named size (tiny, small) or a directory written by save_pretrained (default: tiny)",
    )
    parser.add_argument("--data", required=True, help="the stage's data file")
    parser.add_argument("--out", required=True, help="the cache folder (a killed build continues there)")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="the precision the training will run in (default: auto, bf16 on CUDA)",
    )
    parser.add_argument("--max-tokens", type=int, default=8192, help="LLM tokens per batch (default 8192)")
    parser.add_argument(
        "--dpo-normalization",
        choices=("sum", "length", "openomni"),
        default="sum",
        help="emotion-dpo: how the training will normalise log-likelihoods (default: sum)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--model tiny: the seed it is built with")
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder media paths may point into besides the data file's own (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true")


def cache_command(args) -> int:
    from . import distributed
    from .cache import build_cache

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be an integer >= 1, got {args.max_tokens}")
    stage = get_stage(args.stage)
    model, processor = load_model(args.model, args.seed)
    records = records_for(model, args.data, stage, args.media_root)
    check_model_for_stage(model, stage)
    rank, world = distributed.init()
    device = (
        torch.device("cuda", int(__import__("os").environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    cache = build_cache(
        args.out,
        model,
        processor,
        records,
        stage,
        bf16=bf16,
        device=device,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
        rank=rank,
        world=world,
        dpo_normalization=args.dpo_normalization,
    )
    if rank == 0:
        print(f"state cache: {cache.path} ({len(cache.index['shards'])} shards, {cache.index['records']} records)")
    return 0
