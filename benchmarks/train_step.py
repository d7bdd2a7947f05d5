"""The headline figure: a training step of OpenOmni's speech stages, omnifast against OpenOmni's
recipe as it ships, both through the same ``Trainer`` (its optimizer, clipping, autocast), on the
same random weights (nothing is downloaded).

Stage 4 (speech-gen) and stage 5 (emotion-dpo), each with three implementations:
* ``omnifast, state cache``: the state cache built once (timed), then the steady-state step reads
  each record's frozen states and reference log-likelihoods from it; only the decoder trains.
* ``omnifast, no cache``: omnifast's own step with the frozen LLM run every step.
* ``OpenOmni recipe as shipped``: ``openomni_recipe.OpenOmniRecipeLoss``: blank-input encoders per
  record, the LLM's and the decoder's vocabulary logits, gradient checkpointing, the loop MoE,
  einsum cross-attention, full logits and ``F.ctc_loss``, four-pass DPO.
Each at two batch settings: OpenOmni's own (1 record x 4 accumulation steps) and an equal batch of
``--batch`` records. Reported: the optimizer step's median time, units/s, the whole run over
OpenOmni's epochs (2 for stage 4, 3 for stage 5) from the measured step and cache build, the
memory, and on a GPU the largest batch (doubling until out of memory).

Configurations: ``--quick``, ``OmniConfig.tiny()`` (a smoke run of the same code; the suite runs
it); on the CPU by default ``OmniConfig.small()``, OpenOmni's structure at small size with
OpenOmni's proportions (see its docstring); on a GPU ``OmniConfig.openomni_7b()`` in bf16. Memory on a GPU is
``max_memory_allocated``; on the CPU, where the frozen front cannot leave "the device", it is the
step's working set (peak RSS of a fresh process above what it held before the first step, the
optimizer state included) plus the bytes of the weights the implementation keeps on the device
(counted: the decoder alone from the cache; the whole model otherwise).
``--estimate`` prints the GPU figures estimated from counted work (``train_step_estimate.py``).
Run ``python -m benchmarks.train_step`` (or ``omnifast bench train_step``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.models.omni import rebuild_buffers
from omnifast.training import MicroBatches, TrainConfig, Trainer, get_stage, load_records
from omnifast.training.cache import build_cache, collate_cached
from omnifast.training.loader import collate_batch

from . import train_step_estimate
from ._harness import RESULTS, environment, write_json
from .openomni_recipe import OpenOmniRecipeLoss

IMPLEMENTATIONS = train_step_estimate.IMPLEMENTATIONS
STAGES = train_step_estimate.STAGES
EPOCHS = train_step_estimate.EPOCHS
SETTINGS = ("1 x 4", "equal batch")


def config_named(name: str) -> OmniConfig:
    if name == "tiny":
        return OmniConfig.tiny()
    if name == "small":
        return OmniConfig.small()
    config = OmniConfig.openomni_7b()
    config.image_token_id, config.speech_token_id = 259, 260  # the byte tokenizer's placeholders
    return config


def build_model(config: OmniConfig, device: torch.device, dtype: torch.dtype) -> OmniModel:
    """The model on the meta device, then materialised on ``device`` in ``dtype`` with random
    weights (normal(0, 0.02) matrices, unit norm scales, zero biases)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = OmniModel(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name or name.endswith(("layernorm.weight", "ln.weight")):
                p.fill_(1.0)
            else:
                p.zero_()
        rebuild_buffers(model, device)
    return model


def write_records(path: Path, count: int, prompt: int, response: int, units: int, unit_vocab: int) -> Path:
    """Text-only speech records: a ``prompt``-character question, a ``response``-character answer
    (one byte token each), ``units`` chosen and rejected units."""
    generator = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = []
    for i in range(count):
        text = "".join(letters[j] for j in torch.randint(0, len(letters), (prompt + response,), generator=generator))
        chosen, rejected = (torch.randint(0, unit_vocab, (units,), generator=generator).tolist() for _ in range(2))
        rows.append(
            {
                "id": f"r{i}",
                "tgt_units": chosen,
                "re_tgt_units": rejected,
                "conversations": [{"from": "human", "value": text[:prompt]}, {"from": "gpt", "value": text[prompt:]}],
            }
        )
    path.write_text(json.dumps(rows))
    return path


def make_trainer(
    name: str,
    model: OmniModel,
    processor,
    records,
    stage: str,
    setting: str,
    batch: int,
    device,
    out_dir: Path,
    cache: Optional[Path],
) -> Trainer:
    size, accum = (1, 4) if setting == "1 x 4" else (batch, 1)
    config = TrainConfig(
        stage=stage,
        batch_size=size,
        grad_accum=accum,
        max_steps=10**6,
        progress=False,
        bf16="on" if device.type == "cuda" else "off",
    )
    if name == "omnifast, state cache":
        return Trainer(model, processor, records, config, out_dir, device=str(device), state_cache=cache)
    loss = None if name == "omnifast, no cache" else OpenOmniRecipeLoss(model, get_stage(stage), config.beta)
    return Trainer(model, processor, records, config, out_dir, device=str(device), loss=loss)


def step_batches(trainer: Trainer, start: int) -> List[Dict[str, object]]:
    """The micro-batches of one optimizer step, from the trainer's own data set, on its device."""
    accum = trainer.config.grad_accum
    sampler = MicroBatches(
        len(trainer.dataset), trainer.config.batch_size, 0, start=start * accum, stop=(start + 1) * accum
    )
    pad = trainer.processor.tokenizer.pad_token_id
    collate = collate_cached if trainer.state_cache is not None else (lambda items: collate_batch(items, pad))
    return [trainer.to_device(collate([trainer.dataset[key] for key in keys])) for keys in sampler]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, steps: int, warmup: int, device) -> List[float]:
    for i in range(warmup):
        trainer.train_step(step_batches(trainer, i))
    synchronize(device)
    times = []
    for i in range(steps):
        batches = step_batches(trainer, warmup + i)
        start = time.perf_counter()
        trainer.train_step(batches)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class SearchTimeUp(Exception):
    """Raised from inside a step when the largest-batch search has used its time."""


def _deadline_hook(deadline: float):
    def check(module, inputs):
        if time.monotonic() > deadline:
            raise SearchTimeUp

    return check


def largest_batch(trainer: Trainer, device, cap: int, seconds: Optional[float] = None) -> Optional[int]:
    """On a GPU: double the records of a step until it runs out of memory (or ``cap``, or the
    search has taken ``seconds``: checked before every module's forward, so a step is cut short
    when the time is up); the last that ran whole."""
    if device.type != "cuda":
        return None
    fitted, size = 0, 1
    deadline = float("inf") if seconds is None else time.monotonic() + seconds
    hooks = [m.register_forward_pre_hook(_deadline_hook(deadline)) for m in trainer.model.modules()]
    try:
        while size <= min(cap, len(trainer.dataset)) and time.monotonic() < deadline:
            trainer.config.batch_size, trainer.config.grad_accum = size, 1
            try:
                trainer.train_step(step_batches(trainer, 0))
                synchronize(device)
            except (torch.cuda.OutOfMemoryError, SearchTimeUp):
                break
            finally:
                trainer.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            fitted, size = size, size * 2
    finally:
        for hook in hooks:
            hook.remove()
    return fitted


def device_weight_bytes(name: str, model: OmniModel, stage: str) -> int:
    """Bytes of the weights an implementation keeps on the device besides its step's working set."""

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    if name == "omnifast, state cache":
        return nbytes(model.speech_decoder)
    return nbytes(model) + (nbytes(model.speech_decoder) if stage == "emotion-dpo" else 0)  # + the reference copy


class Bench:
    """One stage's model, processor, records and state cache; every case starts from the same
    decoder weights (restored after each)."""

    def __init__(
        self, config_name: str, device: torch.device, stage: str, records: int, shape: Dict[str, int], scratch: Path
    ):
        self.device, self.stage = device, stage
        config = config_named(config_name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = build_model(config, device, dtype)
        self.processor = OmniProcessor(build_tiny_tokenizer(), config)
        data = scratch / f"{stage}.json"
        if not data.is_file():
            write_records(
                data, records, shape["prompt"], shape["response"], shape["units"], config.decoder_config().units
            )
        self.records = load_records(data, get_stage(stage), config.decoder_config().units)
        self.cache, self.build_s = scratch / f"cache-{stage}", None
        self.decoder_state = {k: v.clone() for k, v in self.model.speech_decoder.state_dict().items()}

    def build_cache(self) -> None:
        if not (self.cache / "index.json").is_file():
            start = time.perf_counter()
            build_cache(
                self.cache,
                self.model,
                self.processor,
                self.records,
                get_stage(self.stage),
                bf16=self.device.type == "cuda",
                device=self.device,
                progress=False,
            )
            synchronize(self.device)
            self.build_s = time.perf_counter() - start

    def trainer(self, name: str, setting: str, batch: int, out_dir: Path) -> Trainer:
        self.model.speech_decoder.load_state_dict(self.decoder_state)
        decoder = self.model.speech_decoder.decoder
        (getattr(decoder, "activation_checkpointing_disable", None) or decoder.gradient_checkpointing_disable)()
        if name == "omnifast, state cache":
            self.build_cache()
        return make_trainer(
            name, self.model, self.processor, self.records, self.stage, setting, batch, self.device, out_dir, self.cache
        )


def measure_case(
    bench: Bench, name: str, setting: str, batch: int, steps: int, shape: Dict[str, int], out_dir: Path
) -> Dict:
    device = bench.device
    trainer = bench.trainer(name, setting, batch, out_dir)
    times = time_steps(trainer, steps, warmup=1, device=device)
    row = {
        "stage": bench.stage,
        "implementation": name,
        "setting": setting,
        "step_s": statistics.median(times),
        "steps": len(times),
        "records_per_step": trainer.config.batch_size * trainer.config.grad_accum,
        "cache_build_s": bench.build_s if name == "omnifast, state cache" else None,
        "device_weight_bytes": device_weight_bytes(name, bench.model, bench.stage),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train_step(step_batches(trainer, 0))
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        if setting == "equal batch":
            row["largest_batch"] = largest_batch(trainer, device, cap=4096, seconds=shape.get("search_s"))
    del trainer
    return row


def _working_set(trainer: Trainer) -> int:
    """Peak RSS growth over the first optimizer step (activations, gradients, optimizer state)."""
    from ._harness import peak_memory_here

    batches = step_batches(trainer, 0)
    return peak_memory_here(lambda: trainer.train_step(batches), torch.device("cpu"))


def memory_subprocess(args: List[str]) -> Optional[int]:
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), **__import__("os").environ}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_step", *args],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=900,
        ).stdout
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as error:
        print(f"memory not measured: {error}", file=sys.stderr)
        return None
    return int(out.strip().splitlines()[-1])


def run(
    config_name: str,
    device: torch.device,
    steps: int,
    batch: int,
    records: int,
    shape: Dict[str, int],
    memory: bool = True,
    implementations=IMPLEMENTATIONS,
    on_row=None,
) -> Dict:
    """Every (stage, implementation, setting) case; ``on_row(payload)`` after each, with the
    rows so far (gpu-check keeps them when its time runs out)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for stage in STAGES:
            bench = Bench(config_name, device, stage, records, shape, scratch)
            for name in implementations:
                for setting in SETTINGS:
                    row = measure_case(bench, name, setting, batch, steps, shape, scratch / "out")
                    if device.type == "cpu" and memory and setting == "equal batch":
                        working = memory_subprocess(
                            [
                                "--memory-of",
                                stage,
                                name,
                                setting,
                                "--config",
                                config_name,
                                "--batch",
                                str(batch),
                                "--records",
                                str(records),
                                "--scratch",
                                str(scratch),
                                "--shape",
                                json.dumps(shape),
                            ]
                        )
                        row["step_working_bytes"] = working
                        if working is not None:
                            row["peak_bytes"] = working + row["device_weight_bytes"]
                    rows.append(row)
                    print(f"done: {stage} {name} {setting}", file=sys.stderr)
                    if on_row is not None:
                        on_row(_payload(rows, config_name, device, batch, records, shape))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del bench
    return _payload(rows, config_name, device, batch, records, shape)


def _payload(
    rows: List[Dict], config_name: str, device: torch.device, batch: int, records: int, shape: Dict[str, int]
) -> Dict:
    """The rows with their derived figures (units/s, whole run, ratios) and the run's settings."""
    rows = [dict(row) for row in rows]
    for row in rows:
        row["units_per_s"] = row["records_per_step"] * shape["units"] / row["step_s"]
        steps_per_run = EPOCHS[row["stage"]] * math.ceil(records / row["records_per_step"])
        row["whole_run_s"] = steps_per_run * row["step_s"] + (row["cache_build_s"] or 0.0)
    for row in rows:
        for base_name, key in ((IMPLEMENTATIONS[2], "vs_recipe"), (IMPLEMENTATIONS[1], "vs_no_cache")):
            base = next(
                (
                    r
                    for r in rows
                    if r["stage"] == row["stage"]
                    and r["setting"] == row["setting"]
                    and r["implementation"] == base_name
                ),
                None,
            )
            if base is None:
                continue
            row[f"speedup_{key}"] = base["step_s"] / row["step_s"]
            row[f"whole_run_speedup_{key}"] = base["whole_run_s"] / row["whole_run_s"]
            if row.get("peak_bytes") and base.get("peak_bytes"):
                row[f"memory_{key}"] = row["peak_bytes"] / base["peak_bytes"]
            if row.get("largest_batch") and base.get("largest_batch"):
                row[f"largest_batch_{key}"] = row["largest_batch"] / base["largest_batch"]
    return {
        "op": "train_step",
        "description": __doc__,
        "environment": environment(device),
        "config": config_name,
        "dtype": "torch.bfloat16" if device.type == "cuda" else "torch.float32",
        "batch": batch,
        "records": records,
        "shape": shape,
        "rows": rows,
    }


def print_table(payload: Dict) -> None:
    estimate = "ESTIMATE " if "ESTIMATE" in payload["description"][:20] else ""
    print(
        f"\n{estimate}train_step ({payload['config']}, {payload['dtype']}): optimizer step, whole run over "
        f"OpenOmni's epochs, memory"
    )
    header = (
        f"{'stage':12s} {'implementation':28s} {'setting':12s} {'step s':>9s} {'vs recipe':>9s} "
        f"{'vs no cache':>11s} {'units/s':>9s} {'run vs recipe':>13s} {'GiB':>7s} {'mem vs recipe':>13s} "
        f"{'max batch':>9s}"
    )
    print(header)
    print("-" * len(header))
    for r in payload["rows"]:

        def cell(key, fmt, width, unit="", r=r):
            value = r.get(key)
            return f"{value:{width}{fmt}}{unit}" if value is not None else f"{'-':>{width + len(unit)}s}"

        peak = r.get("peak_bytes")
        gib = f"{peak / 2**30:7.2f}" if peak else f"{'-':>7s}"
        print(
            f"{r['stage']:12s} {r['implementation']:28s} {r.get('setting', '-'):12s} {r['step_s']:9.4f} "
            f"{cell('speedup_vs_recipe', '.2f', 8, 'x')} {cell('speedup_vs_no_cache', '.2f', 10, 'x')} "
            f"{r['units_per_s']:9.0f} {cell('whole_run_speedup_vs_recipe', '.2f', 12, 'x')} "
            f"{gib} {cell('memory_vs_recipe', '.2f', 13)} "
            f"{cell('largest_batch', 'd', 9)}"
        )


def plot(payload: Dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r.get("setting", "equal batch") == "equal batch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = [r for r in rows if r["implementation"] == name]
        xs = [j + i * width for j in range(len(mine))]
        axes[0].bar(xs, [r["units_per_s"] for r in mine], width, label=name)
        axes[1].bar(xs, [(r.get("peak_bytes") or 0) / 2**30 for r in mine], width, label=name)
        axes[2].bar(xs, [r["whole_run_s"] / 3600 for r in mine], width, label=name)
    for axis, title in zip(axes, ("speech units / s", "peak GiB", "whole run, hours")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(STAGES))])
        axis.set_xticklabels(STAGES)
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"training step, {payload['config']} ({payload['environment'].get('gpu', 'CPU')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="OmniConfig.tiny() on the CPU: a smoke run of the same code"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--config",
        choices=("tiny", "small", "openomni_7b"),
        default=None,
        help="default: openomni_7b on a GPU, small on the CPU, tiny with --quick",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per case (default 5; quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="records of the equal-batch setting (default 8; CPU 4)")
    parser.add_argument("--records", type=int, default=None, help="records in the data set (default 32; quick 8)")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="no GPU: the 7B figures estimated from counted FLOPs and bytes, labelled so",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)  # `omnifast bench all` passes it
    parser.add_argument("--memory-of", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.estimate:
        payload = train_step_estimate.estimate()
        payload["fits_24gb"] = train_step_estimate.fits_24gb()
        print_table(payload)
        print("ESTIMATE: counted FLOPs and bytes at measured H100 rates, not a measurement")
        return _write(payload, Path(args.out), "train_step-estimate")
    config_name = args.config or ("tiny" if args.quick else "openomni_7b" if device.type == "cuda" else "small")
    tiny = config_name == "tiny"
    shape = {"prompt": 6, "response": 5, "units": 12} if tiny else {"prompt": 64, "response": 60, "units": 300}
    batch = args.batch or (2 if tiny else 8 if device.type == "cuda" else 4)
    records = args.records or (8 if tiny else 32)
    if args.memory_of:  # a child process: one case's working set
        stage, name, setting = args.memory_of
        bench = Bench(config_name, device, stage, records, json.loads(args.shape), Path(args.scratch))
        print(_working_set(bench.trainer(name, setting, batch, Path(args.scratch) / "out")))
        return 0
    payload = run(
        config_name,
        device,
        args.steps or args.repeats or (1 if tiny else 5),
        batch,
        records,
        shape,
        memory=not args.no_memory,
    )
    print_table(payload)
    name = ("quick_" if args.quick else "") + "train_step" + ("-cuda" if device.type == "cuda" else "")
    return _write(payload, Path(args.out), name)


def _write(payload: Dict, out_dir: Path, name: str) -> int:
    path = write_json(out_dir / f"{name}.json", payload)
    drawn = plot(payload, path.with_suffix(".png"))
    print(f"\nwrote {path}" + (f" and {path.with_suffix('.png')}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
