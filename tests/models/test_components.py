"""Building from Hugging Face component folders (placeholders added, sizes taken from the
components or a config in full) and saving in transformers' sharded layout (read back shard by
shard onto a meta-built model, and by huggingface_hub's own loader)."""

import json

import numpy as np
import pytest
import torch

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer, save_speech_decoder
from omnifast.models.components import load_components
from omnifast.models.weights import INDEX_NAME
from omnifast.nn.speech_decoder import SpeechDecoderConfig

TINY = OmniConfig.tiny()
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
WAVE = (np.random.default_rng(1).standard_normal(12000) * 0.1).astype(np.float32)


def plain_tokenizer():
    """A byte-level tokenizer with ChatML but no <image>/<speech>, like an LLM's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def folders(root):
    return dict(llm=root / "llm", vision=root / "vision", speech=root / "speech")


def test_placeholders_are_added_and_the_embeddings_grow(components):
    root, parts, words = components
    model, processor = load_components(**folders(root))
    c = model.config
    assert (c.image_token_id, c.speech_token_id) == (words, words + 1) == (259, 260)
    assert model.llm.get_input_embeddings().num_embeddings == c.llm["vocab_size"] == words + 2
    kept = parts["llm"].get_input_embeddings().weight
    assert torch.equal(model.llm.get_input_embeddings().weight[:words], kept)
    for ours, theirs in ((model.vision, parts["vision"]), (model.speech, parts["speech"].get_encoder())):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    batch = processor(
        [[{"from": "human", "value": "<image> and <speech>"}, {"from": "gpt", "value": "Red."}]],
        images=[[IMAGE]],
        audios=[[WAVE]],
    )
    assert (batch["input_ids"] == 259).sum() == c.image_tokens and (batch["input_ids"] == 260).sum() == c.speech_tokens
    assert torch.isfinite(model(**batch).loss)


def test_sizes_come_from_the_components_without_a_config(components):
    root, _, words = components
    c = load_components(**folders(root))[0].config
    assert (c.audio_seconds, c.image_size, c.speech_projector_hidden) == (1, 32, 128)
    assert c.decoder_config() == SpeechDecoderConfig.scaled_to(128, words + 2)
    assert SpeechDecoderConfig.scaled_to(3584, 152064) == SpeechDecoderConfig.openomni(text_vocab=152064)


def test_a_config_is_honoured_in_full(components):
    root, _, _ = components
    config = OmniConfig(
        **{
            **TINY.to_dict(),
            "speech_projector_hidden": 96,
            "speech_stack": 10,
            "speech_decoder": {**TINY.speech_decoder, "layers": 3, "text_vocab": 400},
        }
    )
    model = load_components(**folders(root), config=config)[0]
    c = model.config
    assert (c.speech_projector_hidden, c.speech_stack, c.audio_seconds) == (96, 10, 1)
    assert c.decoder_config() == SpeechDecoderConfig.from_dict({**config.speech_decoder, "llm_hidden": 128})
    assert model.speech_projector.net[0].in_features == 64 * 10 and model.speech_projector.net[0].out_features == 96
    assert len(model.speech_decoder.decoder.layers) == 3
    assert load_components(**folders(root), config=config, speech_stack=5)[0].config.speech_stack == 5
    with pytest.raises(ValueError, match="image_size=336 was asked for, but the components fix it at 32"):
        load_components(**folders(root), config=OmniConfig.openomni_7b())
    with pytest.raises(ValueError, match="audio_seconds=30 was asked for, but the components fix it at 1"):
        load_components(**folders(root), config=config, audio_seconds=30)
    with pytest.raises(ValueError, match="embeds 100 text tokens but the tokenizer has 261"):
        load_components(
            **folders(root),
            config=OmniConfig(**{**TINY.to_dict(), "speech_decoder": {**TINY.speech_decoder, "text_vocab": 100}}),
        )


def test_a_saved_decoder_and_missing_pieces(components, tmp_path):
    root, _, _ = components
    torch.manual_seed(1)
    decoder = OmniModel(TINY).speech_decoder
    save_speech_decoder(decoder, tmp_path / "decoder")
    built = load_components(**folders(root), decoder=tmp_path / "decoder")[0]
    for (name, a), b in zip(built.speech_decoder.state_dict().items(), decoder.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_components(**{**folders(root), "llm": tmp_path / "nothing"})
    bare = tmp_path / "bare-llm"
    bare.mkdir()
    (bare / "config.json").write_text((root / "llm" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_components(**{**folders(root), "llm": bare})


def test_processor_names_the_fix_for_a_tokenizer_without_placeholders():
    with pytest.raises(ValueError, match="add_placeholder_tokens"):
        OmniProcessor(plain_tokenizer(), TINY)


# ---- sharded saving and loading ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return OmniModel(TINY), OmniProcessor(build_tiny_tokenizer(), TINY)


def test_sharded_save_is_transformers_layout_and_loads_bit_exact(tiny_model, tmp_path):
    from huggingface_hub import load_torch_model

    model, processor = tiny_model
    model.save_pretrained(tmp_path, processor, max_shard_size=300_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    loaded = OmniModel.from_pretrained(tmp_path)
    for (name, a), b in zip(state.items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    hub = OmniModel(TINY)
    load_torch_model(hub, tmp_path, strict=True)  # huggingface_hub's reader of the layout
    for (name, a), b in zip(state.items(), hub.state_dict().values()):
        assert torch.equal(a, b), name
    model.save_pretrained(tmp_path)  # one shard now: the old shards and index go
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_builds_on_meta_and_never_initialises(tiny_model, tmp_path, monkeypatch):
    model, _ = tiny_model
    model.save_pretrained(tmp_path, max_shard_size=300_000)

    def refuse(self, *args, **kwargs):
        if not self.weight.is_meta:
            raise AssertionError("a layer was initialised")

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", refuse)
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters", refuse)
    with pytest.raises(AssertionError, match="initialised"):
        OmniModel(TINY)  # the check sees a model built on the CPU
    loaded = OmniModel.from_pretrained(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())


def test_broken_saves_are_named(tiny_model, tmp_path):
    model, _ = tiny_model
    model.save_pretrained(tmp_path, max_shard_size=300_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names {shard.name}, which is missing"):
        OmniModel.from_pretrained(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["llm.lm_head.weight"] = "../elsewhere.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the files it names must lie in"):
        OmniModel.from_pretrained(tmp_path)


def test_omnifast_init_makes_a_trainable_model_from_component_folders(components, tmp_path, capsys):
    from omnifast import cli

    root, _, _ = components
    out = tmp_path / "model"
    assert (
        cli.main(
            [
                "init",
                "--llm",
                str(root / "llm"),
                "--vision",
                str(root / "vision"),
                "--speech",
                str(root / "speech"),
                "--units",
                "50",
                "--mode",
                "ar",
                "--speech-ctc",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "speech decoder ar over 50 units" in capsys.readouterr().err
    model = OmniModel.from_pretrained(out)
    assert model.speech_decoder.mode == "ar" and model.config.decoder_config().units == 50
    assert model.speech_ctc_head is not None and torch.isfinite(model.speech_ctc_head.weight).all()
    assert OmniProcessor.from_pretrained(out, model.config).speech_token_id == model.config.speech_token_id
    assert (
        cli.console(
            [
                "init",
                "--llm",
                str(root / "vision"),
                "--vision",
                str(root / "vision"),
                "--speech",
                str(root / "speech"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "llm=" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_omnifast_init_with_a_ctc_projector_adds_the_head_and_a_zero_blank(components, tmp_path):
    from omnifast import cli

    root, _, _ = components
    out = tmp_path / "model"
    argv = ["init", "--llm", str(root / "llm"), "--vision", str(root / "vision"), "--speech", str(root / "speech")]
    for projector in ("ctc_posterior", "ctc_compress"):
        assert cli.main(argv + ["--speech-projector", projector, "--out", str(out / projector)]) == 0
        model = OmniModel.from_pretrained(out / projector)
        assert model.config.speech_projector == projector and model.speech_ctc_head is not None
        assert model.speech_projector.compress == (projector == "ctc_compress")
        assert torch.equal(model.speech_projector.blank, torch.zeros_like(model.speech_projector.blank))
