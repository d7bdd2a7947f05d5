"""An OpenOmni checkpoint folder read into an ``OmniModel`` by key name (OpenOmni's own loader
maps by position), every key accounted for.

The folder is what OpenOmni's training saves (``transformers``' ``save_pretrained`` of its
``LlavaHerQwen`` model): ``config.json`` and the weights as safetensors (one file or shards with
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``weights_only``). Its keys:

* ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``: the Qwen2 LLM;
* ``model.mm_projector.{0,2}``: the image projector (mlp2x_gelu);
* ``model.vision_tower.vision_tower.*``: the CLIP vision tower (``CLIPVisionModel``);
* ``model.speech_encoder.*``: Whisper's encoder in openai-whisper's names (``conv1``,
  ``positional_embedding``, ``blocks.{i}.attn.query`` ..., ``ln_post``), renamed to
  ``transformers``' ``WhisperEncoder``;
* ``model.speech_projector.linear{1,2}``: the frame-stacking speech projector;
* ``model.speech_generator.*``: the CTC speech generator (``keys.py``);
* ``model.copy_speech_generator.*``: its DPO reference, which omnifast keeps as a cache of
  log-likelihoods instead; skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from omnifast.models import OmniConfig, OmniModel
from omnifast.models.weights import rebuild_buffers

from .keys import speech_generator_state_dict

SKIPPED = ("model.copy_speech_generator.",)
WHISPER_BLOCK = {
    "attn_ln": "self_attn_layer_norm",
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "mlp_ln": "final_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
}


def read_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the folder's weights: safetensors (its index's shards confined to the
    folder) or a ``pytorch_model.bin`` of plain tensors (nothing unpickled)."""
    from omnifast.models.safe_load import read_safetensors, read_torch_weights
    from omnifast.models.weights import INDEX_NAME, WEIGHTS_NAME, weight_files

    if (folder / INDEX_NAME).is_file() or (folder / WEIGHTS_NAME).is_file():
        return {k: v for shard in weight_files(folder) for k, v in read_safetensors(shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return read_torch_weights(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _whisper_name(key: str) -> Optional[str]:
    """openai-whisper encoder name -> transformers ``WhisperEncoder`` name."""
    if key == "positional_embedding":
        return "embed_positions.weight"
    if key.startswith(("conv1.", "conv2.")):
        return key
    if key.startswith("ln_post."):
        return "layer_norm." + key[len("ln_post.") :]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        for theirs, ours in WHISPER_BLOCK.items():
            if rest.startswith(theirs + "."):
                return f"layers.{index}.{ours}.{rest[len(theirs) + 1 :]}"
    return None


def openomni_to_omnifast(state: Dict[str, torch.Tensor], config) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(omnifast ``OmniModel`` state dict, OpenOmni keys that map to nothing)."""
    out: Dict[str, torch.Tensor] = {}
    unused: List[str] = []
    generator = {k: v for k, v in state.items() if k.startswith("model.speech_generator.")}
    if generator and config.speech_decoder is not None:
        decoder = speech_generator_state_dict(generator, config.decoder_config(), "model.speech_generator.")
        out.update({f"speech_decoder.{k}": v for k, v in decoder.items()})
    for key, value in state.items():
        if key.startswith(SKIPPED) or key in generator:
            continue
        if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) or key.startswith("lm_head."):
            out[f"llm.{key}"] = value
        elif key.startswith("model.mm_projector."):
            out["image_projector." + key[len("model.mm_projector.") :]] = value
        elif key.startswith("model.vision_tower.vision_tower."):
            out["vision." + key[len("model.vision_tower.vision_tower.") :]] = value
        elif key.startswith("model.speech_projector.linear"):
            index = {"1": "0", "2": "2"}[key[len("model.speech_projector.linear")]]
            out[f"speech_projector.net.{index}." + key.split(".", 3)[3]] = value
        elif key.startswith("model.speech_encoder.") and _whisper_name(key[len("model.speech_encoder.") :]):
            out["speech." + _whisper_name(key[len("model.speech_encoder.") :])] = value
        else:
            unused.append(key)
    return out, unused


def load_moe_state_dict(moe, state_dict: Dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load into omnifast's ``moe`` (an ``omnifast.nn.MoE``) OpenOmni's ``MoE``
    (``openomni/model/speech_generator_ctc/speech_generator.py``): ``gate.fc.weight`` /
    ``gate.fc.bias`` and ``experts.{e}.fc1`` / ``fc2`` per expert, its interleaved token split
    (token j takes output channels j::split) reordered to the ``MoE``'s contiguous one. Needs a
    dense relu MoE with a gate bias; keys under ``prefix``."""
    from .keys import moe_state_dict

    if moe.top_k is not None or moe.activation != "relu":
        raise ValueError("an OpenOmni expert stack loads into a dense (top_k=None) relu MoE")
    if moe.gate.bias is None:
        raise ValueError("OpenOmni's gate has a bias: build this MoE with gate_bias=True")
    missing = [
        k
        for k in [f"{prefix}gate.fc.weight", f"{prefix}gate.fc.bias"]
        + [
            f"{prefix}experts.{e}.{p}"
            for e in range(moe.experts)
            for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
        ]
        if k not in state_dict
    ]
    if missing:
        raise KeyError(f"OpenOmni MoE keys missing: {', '.join(missing)}")
    split = moe.split_tokens
    tensors, _ = moe_state_dict(state_dict, moe.experts, moe.out // split, split, prefix)
    moe.load_state_dict(tensors)


def speech_decoder_from_state_dict(state_dict: Dict[str, torch.Tensor], config, prefix: str = "", **kwargs):
    """A NAR speech decoder holding OpenOmni's speech-generator weights (``SpeechGeneratorCTC``,
    see ``keys.py``); ``prefix``: the generator's key prefix in a whole-model checkpoint (e.g.
    ``"model.speech_generator."``). The decoder takes the checkpoint's dtype."""
    from omnifast.nn import build_speech_decoder

    converted = speech_generator_state_dict(state_dict, config, prefix)
    model = build_speech_decoder(config, "nar", **kwargs).to(converted["head.weight"].dtype)
    model.load_state_dict(converted)
    return model


def load_openomni(path, config=None, allow_nonfinite: bool = False):
    """An OmniModel from an OpenOmni checkpoint folder: see the module docstring. ``config``: the model's sizes
    (default: ``OmniConfig.openomni_7b()`` with the folder's ``config.json`` LLM settings).
    Built on the meta device and given the checkpoint's tensors (in their dtype), so nothing is
    initialised twice. Raises ``ValueError`` naming every missing, unexpected or misshapen key."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not an OpenOmni checkpoint folder")
    if config is None:
        config = OmniConfig.openomni_7b()
        config_file = folder / "config.json"
        if config_file.is_file():
            from omnifast.models.safe_load import read_json

            settings = read_json(config_file, "OpenOmni config")
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "max_position_embeddings",
            ):
                if key in settings:
                    config.llm[key] = settings[key]
    mapped, unused = openomni_to_omnifast(read_weights(folder), config)
    with torch.device("meta"):
        model = OmniModel(config)
    expected = model.state_dict()
    problems = []
    if unused:
        problems.append(f"unexpected keys: {', '.join(unused)}")
    missing = sorted(k for k in expected if k not in mapped)
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    wrong = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} here"
        for k, v in mapped.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        problems.append(f"mismatched shapes: {'; '.join(wrong)}")
    if problems:
        raise ValueError(f"{folder}: not loadable as this OpenOmni model: " + " | ".join(problems))
    from omnifast.models.safe_load import check_tensors, floating_dtype

    mapped = check_tensors(mapped, expected, folder, allow_nonfinite, floating_dtype(mapped))
    model.load_state_dict(mapped, assign=True)
    rebuild_buffers(model, torch.device("cpu"))
    return model
