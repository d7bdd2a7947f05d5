"""An ESTIMATE of the 7B training step on one GPU, from counted FLOPs and bytes, for machines
without a GPU (every figure it prints is labelled an estimate; a GPU run of ``train_step``
replaces it).

Rates: the decoder runs at the rate the H100 measured for it (the decoder step L24 B8 N80 U400 in
bf16 took 128 ms: about 145 TFLOP/s); the frozen LLM's and encoders' forwards, long regular GEMMs,
at 60% of the 798 TFLOP/s an 8192^3 bf16 product reached; memory-bound passes at 3.0 TB/s; the
CTC recursion at the per-frame rates measured for torch's kernel (3.7 ms for 1200 frames) and
estimated for omnifast's. Memory: weights, gradients and AdamW moments as each implementation
keeps them (fp32 master weights, as DeepSpeed ZeRO-2 keeps them in OpenOmni's scripts and as
omnifast's autocast over float32 weights does: 16 bytes per trained parameter), plus activations.

The implementations:
* ``omnifast, state cache``: the steady-state step reads the frozen front's states from the cache
  (only the decoder on the GPU) and the reference's log-likelihoods too; the whole run adds the
  cache build, one LLM forward per record (and one reference pass for stage 5).
* ``omnifast, no cache``: the frozen LLM forward every step, the decoder and its losses fused.
* ``OpenOmni recipe as shipped``: ``benchmarks/openomni_recipe.py``: CLIP-L on a blank image and
  Whisper-large-v3 on a 30-s mel per record, the LLM's and the decoder's 152k-vocabulary logits,
  the decoder layers recomputed (gradient checkpointing), four generator passes for DPO.
"""

from __future__ import annotations

from typing import Dict

import torch

from omnifast.models import OmniConfig, OmniModel

MATMUL_RATE, DECODER_RATE, BANDWIDTH, GPU_BYTES = 0.6 * 798e12, 145e12, 3.0e12, 80 * 2**30
TORCH_CTC_S_PER_FRAME, OURS_CTC_S_PER_FRAME = 3.7e-3 / 1200, 0.6e-3 / 1200
IMPLEMENTATIONS = ("omnifast, state cache", "omnifast, no cache", "OpenOmni recipe as shipped")
STAGES = ("speech-gen", "emotion-dpo")
EPOCHS = {"speech-gen": 2, "emotion-dpo": 3}
TEXT_VOCAB = 151936


def sizes() -> Dict[str, float]:
    """Parameter counts of OpenOmni's 7B model (built on the meta device)."""
    config = OmniConfig.openomni_7b()
    with torch.device("meta"):
        model = OmniModel(config)
    d = model.speech_decoder

    def count(module):
        return sum(p.numel() for p in module.parameters())

    return {
        "llm_layers": count(model.llm.model.layers),
        "vision": count(model.vision),
        "speech": count(model.speech),
        "decoder_layers": count(d.decoder.layers),
        "moe": count(d.moe),
        "decoder": count(d),
        "frozen": count(model) - count(d),
        "hidden": config.hidden,
    }


def step(name: str, stage: str, batch: int, prompt: int, response: int, units: int, s: Dict[str, float]):
    """(seconds, device bytes, activation bytes per record) of one step of ``batch`` records."""
    c = OmniConfig.openomni_7b().decoder_config()
    dpo = stage == "emotion-dpo"
    tokens, frames, rows = (
        batch * (prompt + response),
        batch * max(c.upsample_factor * response, units),
        batch * (response + 2),
    )
    head = 2 * frames * c.width * (c.units + 1)
    decoder_fwd = 2 * s["decoder_layers"] * frames + 2 * s["moe"] * rows + head
    llm_fwd = 2 * s["llm_layers"] * tokens
    trained_state = 16 * s["decoder"]  # fp32 weights, gradients, two moments
    per_frame_activation = c.layers * (8 * c.width + 4 * c.intermediate) * 2  # bf16 tensors a layer keeps
    activations = frames * per_frame_activation
    logits_bytes = frames * (c.units + 1) * (2 + 4 + 4)  # bf16 logits, fp32 log-probs and their gradient
    weights_resident = 2 * s["frozen"]  # the frozen front in bf16
    if name == "omnifast, state cache":
        seconds = 3 * decoder_fwd / DECODER_RATE + (OURS_CTC_S_PER_FRAME * frames / batch) * (1.5 if dpo else 1)
        seconds += 3 * frames * (c.units + 1) * 2 / BANDWIDTH + 16 * s["decoder"] / BANDWIDTH
        return seconds, trained_state + activations, activations / batch
    if name == "omnifast, no cache":
        seconds = llm_fwd / MATMUL_RATE + 3 * decoder_fwd / DECODER_RATE
        seconds += (OURS_CTC_S_PER_FRAME * frames / batch) * (1.5 if dpo else 1)
        seconds += 3 * frames * (c.units + 1) * 2 / BANDWIDTH + 16 * s["decoder"] / BANDWIDTH
        return seconds, weights_resident + trained_state + activations, activations / batch
    # the recipe as shipped
    passes_train, passes_fwd = (2, 2) if dpo else (1, 0)
    encoders = batch * (2 * s["vision"] * 577 + 2 * s["speech"] * 1500)
    vocab = 2 * tokens * s["hidden"] * TEXT_VOCAB + 2 * frames * c.width * TEXT_VOCAB * (passes_train + passes_fwd)
    recompute = decoder_fwd * passes_train  # checkpointed layers run their forward again in the backward
    gemm = llm_fwd + encoders + vocab
    seconds = (
        gemm / MATMUL_RATE + (3 * decoder_fwd * passes_train + recompute + decoder_fwd * passes_fwd) / DECODER_RATE
    )
    seconds += TORCH_CTC_S_PER_FRAME * frames / batch * (passes_train + passes_fwd)
    seconds += 2 * logits_bytes * (passes_train + passes_fwd) / BANDWIDTH + 16 * s["decoder"] / BANDWIDTH
    checkpointed = frames * c.width * 2 * c.layers  # layer inputs kept, the rest recomputed
    transient = logits_bytes * passes_train + frames * TEXT_VOCAB * 2
    reference = 2 * s["decoder"] if dpo else 0  # the deep-copied reference decoder in bf16
    per_batch = checkpointed * passes_train + transient
    return seconds, weights_resident + reference + trained_state + per_batch, per_batch / batch


def estimate(batch: int = 8, prompt: int = 64, response: int = 80, units: int = 300, records: int = 10_000) -> Dict:
    """Every row labelled an estimate: step time, device memory, the largest batch on an 80 GB GPU
    and the whole run over OpenOmni's epochs for ``records`` records (the cache build counted)."""
    s = sizes()
    rows = []
    for stage in STAGES:
        for name in IMPLEMENTATIONS:
            seconds, peak, per_record = step(name, stage, batch, prompt, response, units, s)
            fixed = peak - per_record * batch
            run_s = EPOCHS[stage] * records / batch * seconds
            if name == "omnifast, state cache":  # the build: one LLM forward per record, and the reference
                llm = 2 * s["llm_layers"] * (prompt + response) / MATMUL_RATE
                reference = 2 * s["decoder"] * max(12 * response, units) / DECODER_RATE if stage == "emotion-dpo" else 0
                run_s += records * (llm + reference)
            rows.append(
                {
                    "stage": stage,
                    "implementation": name,
                    "batch": batch,
                    "step_s": seconds,
                    "response_tokens_per_s": batch * response / seconds,
                    "units_per_s": batch * units / seconds,
                    "peak_bytes": peak,
                    "largest_batch": int((GPU_BYTES - fixed) // per_record),
                    "whole_run_s": run_s,
                    "epochs": EPOCHS[stage],
                    "records": records,
                    "estimate": True,
                }
            )
    for row in rows:
        base = next(r for r in rows if r["stage"] == row["stage"] and r["implementation"] == IMPLEMENTATIONS[2])
        row["speedup_vs_recipe"] = base["step_s"] / row["step_s"]
        row["memory_vs_recipe"] = row["peak_bytes"] / base["peak_bytes"]
        row["largest_batch_vs_recipe"] = row["largest_batch"] / base["largest_batch"]
        row["whole_run_speedup_vs_recipe"] = base["whole_run_s"] / row["whole_run_s"]
    return {
        "op": "train_step",
        "description": "ESTIMATE from counted FLOPs and bytes, not a measurement: " + __doc__,
        "environment": {"gpu": "H100 80 GB (estimate, no GPU measurement)"},
        "config": "openomni_7b (estimate)",
        "dtype": "torch.bfloat16",
        "shape": {"batch": batch, "prompt": prompt, "response": response, "units": units},
        "assumptions": {
            "matmul_flops_per_s": MATMUL_RATE,
            "decoder_flops_per_s": DECODER_RATE,
            "bytes_per_s": BANDWIDTH,
            "gpu_bytes": GPU_BYTES,
            "torch_ctc_s_per_frame": TORCH_CTC_S_PER_FRAME,
            "omnifast_ctc_s_per_frame": OURS_CTC_S_PER_FRAME,
        },
        "rows": rows,
    }


def fits_24gb() -> Dict[str, float]:
    """Stage 4 and 5 of the 7B model from the state cache on a 24 GB GPU, by arithmetic: the
    decoder's 16 bytes per parameter and the activations of one record of the shape above."""
    s = sizes()
    _, peak, per_record = step("omnifast, state cache", "emotion-dpo", 1, 64, 80, 300, s)
    return {
        "decoder_state_gib": 16 * s["decoder"] / 2**30,
        "one_record_activations_gib": per_record / 2**30,
        "records_that_fit_24gib": int((24 * 2**30 - 16 * s["decoder"]) // per_record),
    }
