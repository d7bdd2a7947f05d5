"""An OpenOmni checkpoint folder (written here at small size with OpenOmni's key layout: its LLM,
mm_projector, CLIP tower, openai-whisper encoder names, speech projector, speech generator and its
DPO copy, in safetensors shards) loads into an OmniModel by key name, with every missing or
unexpected key named."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from omnifast.models import OmniConfig, OmniModel
from omnifast.nn import SpeechDecoderConfig
from omnifast.openomni import load_openomni
from omnifast.openomni import reference as openomni

OPENAI_WHISPER = {
    "self_attn_layer_norm": "attn_ln",
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "final_layer_norm": "mlp_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
}


def openai_name(key):
    if key == "embed_positions.weight":
        return "positional_embedding"
    if key.startswith("layer_norm."):
        return "ln_post." + key[len("layer_norm.") :]
    if key.startswith("layers."):
        _, index, rest = key.split(".", 2)
        for ours, theirs in OPENAI_WHISPER.items():
            if rest.startswith(ours + "."):
                return f"blocks.{index}.{theirs}.{rest[len(ours) + 1 :]}"
    return key


def openomni_checkpoint(folder, config):
    torch.manual_seed(3)
    source = OmniModel(config)
    generator = openomni.SpeechGenerator(config.decoder_config())
    state = {k: v for k, v in source.llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in source.image_projector.state_dict().items()})
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in source.vision.state_dict().items()})
    state.update({f"model.speech_encoder.{openai_name(k)}": v for k, v in source.speech.state_dict().items()})
    state.update(
        {
            f"model.speech_projector.linear{1 if k.startswith('net.0') else 2}.{k.split('.')[-1]}": v
            for k, v in source.speech_projector.state_dict().items()
        }
    )
    for prefix in ("model.speech_generator.", "model.copy_speech_generator."):
        state.update(
            {prefix + k: v for k, v in generator.state_dict().items() if not k.startswith("llm.model.lm_head")}
        )
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].clone().contiguous() for k in part}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in shards.items() for k in part}})
    )
    return source, generator, state


def small_config():
    config = OmniConfig.tiny()
    config.speech_decoder = asdict(
        SpeechDecoderConfig.openomni(
            **{
                k: v
                for k, v in config.decoder_config().to_dict().items()
                if k not in ("fusion_causal", "upsample_rounding", "loss_normalization", "zero_infinity")
            }
        )
    )
    return config


def test_an_openomni_checkpoint_loads_by_key_name(tmp_path):
    config = small_config()
    source, generator, _ = openomni_checkpoint(tmp_path / "ckpt", config)
    model = load_openomni(tmp_path / "ckpt", config)
    for component in ("llm", "vision", "speech", "image_projector", "speech_projector"):
        ours, theirs = getattr(model, component).state_dict(), getattr(source, component).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{component}.{key}"
    # the speech decoder computes the generator's loss
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, config.hidden)
    labels = torch.full((2, 7), -100)
    labels[:, 2:6] = 5
    units = torch.randint(0, config.decoder_config().units, (2, 9))
    text_tokens = torch.randint(0, 50, (2, 4))
    states_mask = labels != -100
    states = hidden[:, 2:6]
    ours = model.speech_decoder(states, text_tokens, states_mask[:, 2:6], None, units).loss
    torch.testing.assert_close(ours, generator(hidden, labels, units, text_tokens), rtol=1e-5, atol=1e-6)
    # and the model runs: text and speech
    assert torch.isfinite(model(torch.randint(0, 250, (1, 9))).hidden_states).all()


def test_missing_and_unexpected_keys_are_named(tmp_path):
    config = small_config()
    _, _, state = openomni_checkpoint(tmp_path / "ckpt", config)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    dropped = "model.speech_projector.linear2.bias"
    folder = tmp_path / "edited"
    folder.mkdir()
    edited = {k: v for k, v in state.items() if k != dropped}
    edited["model.extra_head.weight"] = torch.zeros(2)
    save_file({k: v.clone().contiguous() for k, v in edited.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        load_openomni(folder, config)
    message = str(error.value)
    assert (
        "unexpected keys: model.extra_head.weight" in message and "missing keys: speech_projector.net.2.bias" in message
    )
    assert index["weight_map"]
    with pytest.raises(FileNotFoundError, match="not an OpenOmni checkpoint folder"):
        load_openomni(tmp_path / "nothing", config)
