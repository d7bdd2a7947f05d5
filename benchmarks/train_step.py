"""The headline figure: one training step of OpenOmni's speech stages, at OpenOmni's sizes.

Stage 4 (speech-gen: frozen Qwen2.5-7B, trained speech decoder) and stage 5 (emotion-dpo: CTC-DPO
against a frozen reference), each run through the same ``Trainer.train_step`` that ``omnifast
train`` runs (bf16 autocast, AdamW, gradient clipping, frozen parts frozen), on
``OmniConfig.openomni_7b()`` built on the meta device and materialised on the GPU in bf16 with
random weights (nothing is downloaded). Two implementations of the loss, on the same weights:

* ``omnifast``: the trainer's own loss (``OmniModel`` + ``SpeechDecoder``: MoE, fused linear-CTC,
  single-pass CTC-DPO with the reference's values computed once per record; every step here
  brings new records, so the reference runs every step, as in a first epoch).
* ``OpenOmni recipe``: the loss as OpenOmni's code computes it, each piece after
  ``openomni/model/speech_generator_ctc/speech_generator.py`` (``SpeechGeneratorCTC.forward``):
  the dense ``MoE`` as a Python loop that stacks every expert's output, the ``RLSIAT`` text-guided
  module with its einsum attention, uniform upsampling, the decoder called as a
  ``Qwen2ForCausalLM`` whose text-vocabulary logits (151,936 per frame) are formed and dropped,
  full (B, T, V) unit logits -> ``log_softmax`` in float32 -> ``F.ctc_loss`` (sum over the units);
  and the DPO after ``openomni/model/language_model/llava_her_qwen.py`` (``forward`` with
  ``tune_speech_generator_dpo``): the policy generator scores chosen and rejected in two passes,
  a deep-copied reference generator in two more, and the frozen 7B LLM's forward forms its own
  text logits, which the recipe also keeps.
* ``OpenOmni recipe, no vocab logits``: the same without the two unused text-vocabulary heads, a
  conservative baseline: what is left to beat is the kernels' own work.

Reported per stage and implementation: step time (median of CUDA-event-timed steps after
warm-up), response tokens/s and speech units/s, peak memory of a step, and the largest batch that
fits (doubling until out of memory, then the last that fitted). Written to
``benchmarks/results/train_step-cuda.json`` with a chart. The full run needs a GPU and says so;
``--quick`` runs the same code with ``OmniConfig.tiny()`` on the CPU (the test suite does).

Run ``python -m omnifast.benchmarks.train_step`` (or ``omnifast bench train_step``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from omnifast.models import OmniConfig, OmniModel
from omnifast.training import Trainer, TrainConfig, get_stage

from ._harness import RESULTS, environment
from .openomni_recipe import OpenOmniRecipeLoss

IMPLEMENTATIONS = ("omnifast", "OpenOmni recipe", "OpenOmni recipe, no vocab logits")
STAGES = ("speech-gen", "emotion-dpo")


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
        _restore_buffers(model, device)
    return model


def _restore_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """to_empty leaves buffers uninitialised: rotary frequencies are rebuilt by a fresh module of
    the same class, position ids are ranges."""
    for module in model.modules():
        if "inv_freq" in module._buffers:
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, value in fresh.named_buffers(recurse=False):
                module._buffers[name] = value.to(module._buffers[name].dtype)
            module.attention_scaling = fresh.attention_scaling
        if "position_ids" in module._buffers:
            ids = module._buffers["position_ids"]
            ids.copy_(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not torch.isfinite(buffer).all():
            raise RuntimeError(f"buffer {name} was left uninitialised by to_empty")


def synthetic_batch(config: OmniConfig, batch: int, prompt: int, response: int, units: int, device, seed: int,
                    dpo: bool) -> Dict[str, object]:
    """A batch of text-only records: ``prompt`` + ``response`` tokens (labels on the response),
    ``units`` target units (and rejected units for DPO), fresh record ids every call."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(config.llm["vocab_size"], 100_000)
    ids = torch.randint(0, vocab, (batch, prompt + response), generator=gen)
    for special in (config.image_token_id, config.speech_token_id):
        ids[ids == special] = special + 1
    labels = ids.clone()
    labels[:, :prompt] = -100
    unit_vocab = config.decoder_config().units
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": None,
           "speech_features": None, "units": torch.randint(0, unit_vocab, (batch, units), generator=gen),
           "ids": [f"{seed}-{b}" for b in range(batch)]}
    if dpo:
        out["rejected_units"] = torch.randint(0, unit_vocab, (batch, units), generator=gen)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def make_trainer(name: str, model: OmniModel, stage: str, device, out_dir: Path) -> Trainer:
    config = TrainConfig(stage=stage, max_steps=10 ** 6, progress=False, bf16="on" if device.type == "cuda" else "off")
    loss = None if name == "omnifast" else OpenOmniRecipeLoss(model, get_stage(stage), config.beta,
                                                              vocab_logits=name == "OpenOmni recipe",
                                                              blank_media=False, checkpointing=False)
    return Trainer(model, None, [], config, out_dir, device=str(device), loss=loss)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, make_batch, steps: int, warmup: int, device) -> List[float]:
    for i in range(warmup):
        trainer.train_step([make_batch(10_000 + i)])
    synchronize(device)
    times = []
    for i in range(steps):
        batch = make_batch(i)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            trainer.train_step([batch])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            start_s = time.perf_counter()
            trainer.train_step([batch])
            times.append(time.perf_counter() - start_s)
    return times


def peak_step_memory(trainer: Trainer, make_batch, device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step([make_batch(20_000)])
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def largest_batch(trainer: Trainer, batch_for, device, cap: int, seconds: Optional[float] = None) -> int:
    """Double the batch until a step runs out of memory (or reaches ``cap``, or the search has
    taken ``seconds``); the last that ran."""
    fitted, size = 0, 1
    deadline = None if seconds is None else time.monotonic() + seconds
    while size <= cap and (deadline is None or time.monotonic() < deadline):
        try:
            trainer.train_step([batch_for(size, 30_000 + size)])
            synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fitted, size = size, size * 2
    return fitted


def run(quick: bool, device: torch.device, steps: int, out_dir: Path, batch: int, prompt: int, response: int,
        units: int, batch_search: bool, implementations=IMPLEMENTATIONS,
        search_seconds: Optional[float] = None) -> Dict:
    config = OmniConfig.tiny() if quick else OmniConfig.openomni_7b()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, device, dtype)
    rows = []
    for stage in STAGES:
        dpo = stage == "emotion-dpo"
        for name in implementations:
            trainer = make_trainer(name, model, stage, device, out_dir / "scratch")

            def make_batch(seed, size=batch):
                return synthetic_batch(config, size, prompt, response, units, device, seed, dpo)
            times = time_steps(trainer, make_batch, steps, warmup=1 if quick else 2, device=device)
            step_s = statistics.median(times)
            row = {"stage": stage, "implementation": name, "batch": batch, "step_s": step_s, "steps": len(times),
                   "response_tokens_per_s": batch * response / step_s, "units_per_s": batch * units / step_s,
                   "peak_bytes": peak_step_memory(trainer, make_batch, device)}
            if batch_search:
                row["largest_batch"] = largest_batch(trainer, lambda size, seed: make_batch(seed, size), device,
                                                     cap=8 if quick else 4096, seconds=search_seconds)
            rows.append(row)
            print(f"done: {stage} {name}", file=sys.stderr)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        base = next(r for r in rows if r["stage"] == row["stage"] and r["implementation"] == "OpenOmni recipe")
        row["speedup_vs_recipe"] = base["step_s"] / row["step_s"]
        if row.get("peak_bytes") and base.get("peak_bytes"):
            row["memory_vs_recipe"] = row["peak_bytes"] / base["peak_bytes"]
        if row.get("largest_batch") and base.get("largest_batch"):
            row["largest_batch_vs_recipe"] = row["largest_batch"] / base["largest_batch"]
    return {"op": "train_step", "description": __doc__, "environment": environment(device),
            "config": "tiny" if quick else "openomni_7b", "dtype": str(dtype),
            "shape": {"batch": batch, "prompt": prompt, "response": response, "units": units}, "rows": rows}


# --- an estimate from counted work, for a session without a GPU ---------------------------------
# Rates measured on an H100 of this workplace (the device tool's KINDS.md, 2026-11-13): a bf16
# 8192^3 matrix product at 798 TFLOP/s and a device copy at 3.0 TB/s. These GEMMs are smaller and
# thinner (896-wide decoder), so 60% of the matrix rate is assumed. torch's CTC recursion was
# measured at 3.7 ms for 1200 frames (../shared/perf/h100-2026-11-24.md: alpha 1.15 + backward
# 2.56 ms at (16,1200,6561,500)) and scales with the frames; omnifast's is estimated in
# kernels/ctc.py (0.4-0.6 ms for 1200 frames, alpha and beta met in the middle, chosen and
# rejected in the same launch).
GEMM_RATE, BANDWIDTH, GPU_BYTES = 0.6 * 798e12, 3.0e12, 80 * 2**30
TORCH_CTC_S_PER_FRAME, OURS_CTC_S_PER_FRAME = 3.7e-3 / 1200, 0.6e-3 / 1200


def estimate(batch: int, prompt: int, response: int, units: int) -> Dict:
    """Step time, memory and largest batch of each implementation from counted FLOPs and bytes
    (labelled an estimate everywhere it is shown)."""
    config = OmniConfig.openomni_7b()
    with torch.device("meta"):
        model = OmniModel(config)
    d, c = model.speech_decoder, config.decoder_config()
    llm_layers = sum(p.numel() for p in model.llm.model.layers.parameters())
    dec_layers = sum(p.numel() for p in d.decoder.layers.parameters())
    moe = sum(p.numel() for p in d.moe.parameters())
    weights = 2 * sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in d.parameters())
    per_frame_activation = c.layers * (8 * c.width + 4 * c.intermediate) * 2  # bf16 tensors a layer keeps

    def per_step(B, name, stage):
        tokens, frames, rows = B * (prompt + response), B * max(c.upsample_factor * response, units), B * (response + 2)
        head = 2 * frames * c.width * (c.units + 1)
        decoder_fwd = 2 * dec_layers * frames + 2 * moe * rows + head  # the MoE runs on the response states
        vocab = name == "OpenOmni recipe"
        logits_bytes = frames * (c.units + 1) * (2 + 4 + 4)  # bf16 logits, fp32 log-probs and their gradient
        gemm = 2 * llm_layers * tokens + (2 * tokens * config.hidden * 152064 if vocab else 0)
        bytes_moved = 16 * trainable  # AdamW: bf16 parameter, gradient and two moments read and written
        seconds, activations, transient = 0.0, frames * per_frame_activation, 0
        if name == "omnifast":
            passes_train, passes_fwd = 1, (1 if stage == "emotion-dpo" else 0)  # the reference, first epoch
            # the policy's chosen and rejected in one chain of T steps; the reference's (no grad) T/2
            seconds += OURS_CTC_S_PER_FRAME * frames / B * (1.5 if stage == "emotion-dpo" else 1)
            bytes_moved += 3 * frames * (c.units + 1) * 2 * (passes_train + passes_fwd)
        else:
            passes_train, passes_fwd = (2, 2) if stage == "emotion-dpo" else (1, 0)
            seconds += TORCH_CTC_S_PER_FRAME * frames / B * (passes_train + passes_fwd)
            bytes_moved += 2 * logits_bytes * (passes_train + passes_fwd)
            activations *= passes_train  # chosen and rejected graphs are both alive until backward
            transient = logits_bytes * passes_train
            if vocab:
                gemm += 2 * frames * c.width * 151936 * (passes_train + passes_fwd)
                transient += frames * 151936 * 2
        gemm += 3 * decoder_fwd * passes_train + decoder_fwd * passes_fwd
        seconds += gemm / GEMM_RATE + bytes_moved / BANDWIDTH
        return seconds, weights + 6 * trainable + activations + transient, activations + transient

    rows = []
    for stage in STAGES:
        for name in IMPLEMENTATIONS:
            step_s, peak, per_batch = per_step(batch, name, stage)
            per_record = per_batch / batch
            rows.append({"stage": stage, "implementation": name, "batch": batch, "step_s": step_s,
                         "response_tokens_per_s": batch * response / step_s, "units_per_s": batch * units / step_s,
                         "peak_bytes": peak, "largest_batch": int((GPU_BYTES - weights - 6 * trainable) // per_record),
                         "estimate": True})
    for row in rows:
        base = next(r for r in rows if r["stage"] == row["stage"] and r["implementation"] == "OpenOmni recipe")
        row["speedup_vs_recipe"] = base["step_s"] / row["step_s"]
        row["memory_vs_recipe"] = row["peak_bytes"] / base["peak_bytes"]
        row["largest_batch_vs_recipe"] = row["largest_batch"] / base["largest_batch"]
    return {"op": "train_step", "description": "ESTIMATE from counted FLOPs and bytes, not a measurement: " + __doc__,
            "environment": {"gpu": "H100 (estimate, no GPU measurement)"}, "config": "openomni_7b (estimate)",
            "dtype": "torch.bfloat16", "shape": {"batch": batch, "prompt": prompt, "response": response,
                                                "units": units},
            "assumptions": {"gemm_flops_per_s": GEMM_RATE, "bytes_per_s": BANDWIDTH, "gpu_bytes": GPU_BYTES,
                            "torch_ctc_s_per_frame": TORCH_CTC_S_PER_FRAME,
                            "omnifast_ctc_s_per_frame": OURS_CTC_S_PER_FRAME}, "rows": rows}


def print_table(payload: Dict) -> None:
    print(f"\ntrain_step ({payload['config']}, {payload['dtype']}): median seconds per step, throughput, peak "
          f"memory, largest batch")
    header = (f"{'stage':12s} {'implementation':34s} {'step s':>9s} {'vs recipe':>9s} {'tokens/s':>10s} "
              f"{'units/s':>10s} {'peak GiB':>9s} {'max batch':>9s}")
    print(header)
    print("-" * len(header))
    for r in payload["rows"]:
        peak = f"{r['peak_bytes'] / 2**30:9.2f}" if r.get("peak_bytes") else f"{'-':>9s}"
        fits = f"{r['largest_batch']:9d}" if r.get("largest_batch") else f"{'-':>9s}"
        print(f"{r['stage']:12s} {r['implementation']:34s} {r['step_s']:9.4f} {r['speedup_vs_recipe']:8.2f}x "
              f"{r['response_tokens_per_s']:10.1f} {r['units_per_s']:10.1f} {peak} {fits}")


def plot(payload: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = list(dict.fromkeys(r["implementation"] for r in payload["rows"]))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [r for r in payload["rows"] if r["implementation"] == name]
        xs = [j + i * width for j in range(len(rows))]
        axes[0].bar(xs, [r["units_per_s"] for r in rows], width, label=name)
        axes[1].bar(xs, [(r.get("peak_bytes") or 0) / 2**30 for r in rows], width, label=name)
        axes[2].bar(xs, [r.get("largest_batch") or 0 for r in rows], width, label=name)
    for axis, title in zip(axes, ("speech units / s", "peak GiB per step", "largest batch")):
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(STAGES))])
        axis.set_xticklabels(STAGES)
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"one training step, {payload['config']} ({payload['environment'].get('gpu', 'CPU')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="OmniConfig.tiny() on the CPU: a smoke run of the same code")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 10; quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="records per step (default 8; quick 2)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; quick 6)")
    parser.add_argument("--response", type=int, default=None, help="response tokens (default 80; quick 5)")
    parser.add_argument("--units", type=int, default=None, help="speech units per response (default 300; quick 12)")
    parser.add_argument("--no-batch-search", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--estimate", action="store_true",
                        help="no GPU: the full-size figures estimated from counted FLOPs and bytes, labelled so")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)  # `omnifast bench all` passes it
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.estimate:
        payload = estimate(args.batch or 8, args.prompt or 64, args.response or 80, args.units or 300)
        print_table(payload)
        print("ESTIMATE: counted FLOPs and bytes at measured H100 rates, not a measurement")
        return _write(payload, Path(args.out), "train_step-estimate")
    if not args.quick and device.type != "cuda":
        print("omnifast bench train_step needs a GPU: OpenOmni's 7B model trains in bf16 on one. Run it with "
              "--device cuda on a GPU machine, or --quick for a CPU smoke run at tiny size.", file=sys.stderr)
        return 2
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = run(quick, device, pick(args.steps or args.repeats, 10, 2), out_dir, pick(args.batch, 8, 2),
                  pick(args.prompt, 64, 6), pick(args.response, 80, 5), pick(args.units, 300, 12),
                  not args.no_batch_search)
    print_table(payload)
    return _write(payload, out_dir, ("quick_" if quick else "") + "train_step" + ("-cuda" if device.type == "cuda" else ""))


def _write(payload: Dict, out_dir: Path, name: str) -> int:
    import json
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    plot(payload, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
