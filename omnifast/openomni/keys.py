"""OpenOmni's checkpoints in omnifast's modules: the key names and layouts of its speech generator
(``openomni/model/speech_generator_ctc/speech_generator.py``) translated by name.

* Its MoE ``input_proj`` holds ``gate.fc`` (with a bias) and ``experts.{e}.fc1`` / ``fc2`` per
  expert; each expert's output is split into tokens interleaved
  (``rearrange('b n (d1 d2) -> b (n d2) d1', d2=4)``: token j takes channels j::4), where omnifast
  splits contiguously (token j takes channels j*W .. (j+1)*W - 1), so the output rows are
  reordered on load.
* Its text-guided module ``fusion`` (``layers.{i}.0`` cross-attention with ``norm_text`` over the
  context and ``norm_image`` over the queries, ``layers.{i}.1`` feed-forward, ``norm``).
* Its decoder ``llm.model`` is a ``Qwen2ForCausalLM`` whose vocabulary head is unused; its CTC head
  is ``llm_decoder`` and its sos/task embeddings ``llm_embedding``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

ATTENTION_NAMES = {"norm_text": "norm_context", "norm_image": "norm_query"}


def interleaved_order(width: int, split: int) -> torch.Tensor:
    """Row order taking OpenOmni's interleaved split (token j: channels j::split) to omnifast's
    contiguous one (token j: channels j * width ...)."""
    return (torch.arange(width)[None, :] * split + torch.arange(split)[:, None]).reshape(-1)


def moe_state_dict(
    state: Dict[str, torch.Tensor], experts: int, width: int, split: int, prefix: str = ""
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """omnifast ``MoE`` tensors from OpenOmni's MoE keys under ``prefix`` (``gate.fc.weight``,
    ``gate.fc.bias``, ``experts.{e}.fc1/fc2.weight/bias``), and the keys it used."""
    used = [f"{prefix}gate.fc.weight", f"{prefix}gate.fc.bias"]
    out = {"gate.weight": state[used[0]], "gate.bias": state[used[1]]}
    for ours, theirs in (("w1", "fc1.weight"), ("b1", "fc1.bias"), ("w2", "fc2.weight"), ("b2", "fc2.bias")):
        keys = [f"{prefix}experts.{e}.{theirs}" for e in range(experts)]
        out[ours] = torch.stack([state[k] for k in keys])
        used += keys
    if split > 1:
        order = interleaved_order(width, split)
        out["w2"], out["b2"] = out["w2"][:, order], out["b2"][:, order]
    return out, used


def speech_generator_state_dict(state: Dict[str, torch.Tensor], config, prefix: str = "") -> Dict[str, torch.Tensor]:
    """A :class:`~omnifast.nn.ctc_decoder.CTCSpeechDecoder` state dict from OpenOmni's
    ``SpeechGeneratorCTC`` keys under ``prefix``. Raises ``KeyError`` naming every key of the
    generator that is missing; its unused vocabulary head ``llm.model.lm_head`` is dropped."""
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    needed = [
        "llm_embedding.weight",
        "llm_decoder.weight",
        "llm_decoder.bias",
        "input_proj.gate.fc.weight",
        "input_proj.gate.fc.bias",
    ]
    needed += [
        f"input_proj.experts.{e}.{p}"
        for e in range(config.experts)
        for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    ]
    missing = [prefix + k for k in needed if k not in sd]
    if missing:
        raise KeyError(f"OpenOmni speech generator keys missing: {', '.join(missing)}")
    moe, _ = moe_state_dict(sd, config.experts, config.width, config.split_tokens, "input_proj.")
    out = {
        "specials.weight": sd["llm_embedding.weight"],
        "head.weight": sd["llm_decoder.weight"],
        "head.bias": sd["llm_decoder.bias"],
        **{f"moe.{k}": v for k, v in moe.items()},
    }
    for key, value in sd.items():
        parts = key.split(".")
        if parts[:2] == ["fusion", "layers"]:  # fusion.layers.{i}.0 = attention, .1 = feed-forward
            layer, block, rest = parts[2], parts[3], parts[4:]
            if block == "0":
                rest[0] = ATTENTION_NAMES.get(rest[0], rest[0])
                out[f"text_guided.layers.{layer}.attn." + ".".join(rest)] = value
            else:
                out[f"text_guided.layers.{layer}.ff." + ".".join(rest)] = value
        elif parts[0] == "fusion":
            out["text_guided." + ".".join(parts[1:])] = value
        elif key.startswith("llm.model.model."):
            out["decoder." + key[len("llm.model.model.") :]] = value
    return out
