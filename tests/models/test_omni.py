"""OmniModel and OmniProcessor at tiny size: mixed batches forward and backward, exact label
masking, placeholders, freezing, save/load, generation with and without speech (whole and
streamed), the 7B config on the meta device, and bad input."""

import copy

import numpy as np
import pytest
import torch

from omnifast.models import IGNORE_INDEX, OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer, response_states

from ..devices import device_for, moved

DEVICE = device_for()

IMAGE = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
WAVE = (np.random.default_rng(1).standard_normal(12000) * 0.1).astype(np.float32)
CONVERSATIONS = [
    [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}],
    [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "You said hi."}],
    [
        {"from": "human", "value": "<image> and <speech>"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ],
]
MEDIA = dict(images=[[], [IMAGE], [], [IMAGE]], audios=[[], [], [WAVE], [WAVE]])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    return OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)


def test_mixed_batch_forward_and_backward(tiny):
    model, processor = tiny
    batch = processor(CONVERSATIONS, **MEDIA)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["speech_features"].shape[0] == 2
    units = torch.randint(0, 20, (4, 10))
    model = copy.deepcopy(model).to(DEVICE)  # the test device (tests/devices.py)
    out = model(**moved(batch, DEVICE), units=units.to(DEVICE))
    assert torch.isfinite(out.loss) and out.text_loss is not None and out.speech_loss is not None
    out.loss.backward()
    for name in ("llm", "vision", "speech", "image_projector", "speech_projector", "speech_decoder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_labels_mask_everything_but_the_assistant_text(tiny):
    _, processor = tiny
    item = processor.encode_conversation(CONVERSATIONS[3], [IMAGE], [WAVE])
    ids, labels = item["input_ids"], item["labels"]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert processor.tokenizer.decode(ids[kept]) == "Red.<|im_end|>Yes.<|im_end|>"
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    config = processor.config
    assert int((ids == config.image_token_id).sum()) == config.image_tokens
    assert int((ids == config.speech_token_id).sum()) == config.speech_tokens


def test_placeholders_receive_the_projected_features_in_order(tiny):
    model, processor = tiny
    two = np.zeros((32, 32, 3), dtype=np.uint8)
    item = processor.encode_conversation([{"from": "human", "value": "<image> then <image>"}], [IMAGE, two])
    with torch.no_grad():
        embeds = model.embed(item["input_ids"][None], item["pixel_values"])
        features = model.encode_images(item["pixel_values"])
    slots = item["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(embeds[0, slots], features.reshape(-1, features.shape[-1]))


def test_response_states_pack_the_labelled_positions():
    hidden = torch.arange(12.0).view(2, 6, 1)
    labels = torch.tensor([[-100, 5, 6, -100, -100, -100], [-100, -100, -100, 7, 8, 9]])
    states, tokens, mask = response_states(hidden, labels)
    assert states[..., 0].tolist() == [[1, 2, 0], [9, 10, 11]] and tokens.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_freezing_by_component_and_a_frozen_llm_runs_without_grad(tiny):
    model, processor = tiny
    model.freeze(except_=["speech_decoder"])
    assert model.trainable_components() == ["speech_decoder"]
    out = model(**processor(CONVERSATIONS[:1]), units=torch.randint(0, 20, (1, 5)))
    assert out.hidden_states.grad_fn is None and out.speech_loss.requires_grad
    model.trainable("llm", "image_projector")
    assert model.trainable_components() == ["llm", "image_projector", "speech_decoder"]
    with pytest.raises(ValueError, match="unknown component"):
        model.freeze(except_=["vocoder"])
    model.requires_grad_(True)


def test_save_load_round_trip_is_bit_exact(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path, processor)
    loaded = OmniModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    again = OmniProcessor.from_pretrained(tmp_path, loaded.config)
    batch = again(CONVERSATIONS, **MEDIA)
    assert torch.equal(batch["input_ids"], processor(CONVERSATIONS, **MEDIA)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
    assert not list(tmp_path.glob("*.tmp"))


def test_generate_with_and_without_speech(tiny):
    model, processor = tiny
    prompt = processor.encode_conversation(
        [{"from": "human", "value": "<image> hi"}], [IMAGE], add_generation_prompt=True
    )
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    quiet = model.generate(
        prompt["input_ids"], prompt["pixel_values"], max_new_tokens=6, eos_token_id=eos, tokenizer=processor.tokenizer
    )
    assert 1 <= len(quiet.token_ids) <= 6 and quiet.units == [] and quiet.first_token_s > 0
    spoken = model.generate(
        prompt["input_ids"],
        prompt["pixel_values"],
        max_new_tokens=6,
        eos_token_id=eos,
        speak=True,
        unit_chunk=2,
        tokenizer=processor.tokenizer,
    )
    assert spoken.token_ids == quiet.token_ids  # greedy: speaking does not change the text
    # the streamed units equal the decoder's one-pass units on the same LLM states
    with torch.no_grad():
        ids = torch.cat([prompt["input_ids"], torch.tensor(spoken.token_ids)])[None]
        hidden = model.llm.model(inputs_embeds=model.embed(ids, prompt["pixel_values"])).last_hidden_state
        n = len(spoken.token_ids)
        expected = model.speech_decoder.generate(hidden[:, -n:], ids[:, -n:])[0]
    assert spoken.units == expected and spoken.first_unit_s is not None


def test_stream_answer_yields_tokens_and_units_as_they_come(tiny):
    model, processor = tiny
    prompt = processor.encode_conversation([{"from": "human", "value": "hi"}], add_generation_prompt=True)
    forced = [5, 9, 11, 3, 7, 2, 8, 4]
    events = list(model.stream_answer(prompt["input_ids"], speak=True, unit_chunk=2, forced_tokens=forced))
    kinds = [e.kind for e in events]
    assert [e.token for e in events if e.kind == "token"] == forced
    assert "units" in kinds and kinds.index("units") < len(kinds) - 1 - kinds[::-1].index(
        "token"
    )  # not only at the end
    assert all(a.seconds <= b.seconds for a, b in zip(events, events[1:]))
    whole = model.generate(prompt["input_ids"], speak=True, unit_chunk=2, forced_tokens=forced)
    assert whole.units == [u for e in events for u in e.units]


def test_a_decoder_that_cannot_stream_speaks_once_the_text_is_done():
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    config.speech_decoder = {**config.speech_decoder, "fusion_causal": False}
    model = OmniModel(config).eval()
    forced = [5, 9, 11, 3, 7, 2]
    assert not model.streams_speech
    events = list(model.stream_answer(torch.tensor([1, 2, 3]), speak=True, unit_chunk=2, forced_tokens=forced))
    assert [e.kind for e in events] == ["token"] * 6 + ["units"]
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3] + forced])
        hidden = model.llm.model(inputs_embeds=model.embed(ids)).last_hidden_state
        expected = model.speech_decoder.generate(hidden[:, -6:], ids[:, -6:])[0]
    assert events[-1].units == expected


def test_openomni_7b_on_the_meta_device():
    with torch.device("meta"):
        model = OmniModel(OmniConfig.openomni_7b())
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("llm", "vision", "speech", "image_projector", "speech_projector", "speech_decoder")
    }
    print({k: f"{v / 1e9:.3f}B" for k, v in counts.items()}, f"total {sum(counts.values()) / 1e9:.2f}B")
    assert 7.5e9 < counts["llm"] < 7.7e9 and 0.5e9 < counts["speech_decoder"] < 0.7e9
    assert all(p.is_meta for p in model.parameters())
    assert OmniConfig.from_dict(OmniConfig.openomni_7b().to_dict()) == OmniConfig.openomni_7b()


def test_audio_is_mixed_to_mono_and_resampled_to_the_models_rate(tiny):
    """Stereo (either layout) is the mean of its channels; another rate is resampled (soxr)."""
    from omnifast.audio import resample

    _, processor = tiny
    speech = [{"from": "human", "value": "<speech>"}]
    mono = processor.encode_conversation(speech, audios=[WAVE])["speech_features"]
    other = (np.random.default_rng(2).standard_normal(12000) * 0.1).astype(np.float32)
    mixed = processor.encode_conversation(speech, audios=[(WAVE + other) / 2])["speech_features"]
    for stereo in (np.stack([WAVE, other], 1), np.stack([WAVE, other])):
        torch.testing.assert_close(processor.encode_conversation(speech, audios=[stereo])["speech_features"], mixed)
    at_8k = resample(WAVE, 16000, 8000)
    torch.testing.assert_close(
        processor.encode_conversation(speech, audios=[at_8k], sampling_rate=8000)["speech_features"],
        processor.encode_conversation(speech, audios=[resample(at_8k, 8000, 16000)])["speech_features"],
    )
    assert mono.shape == mixed.shape


def test_bad_input(tiny, tmp_path):
    model, processor = tiny
    ask = [{"from": "human", "value": "<image> <image>"}]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor.encode_conversation(ask, [IMAGE])
    with pytest.raises(ValueError, match="0 <speech> placeholders but 1 audios"):
        processor.encode_conversation([{"from": "human", "value": "hi"}], audios=[WAVE])
    speech = [{"from": "human", "value": "<speech>"}]
    with pytest.raises(ValueError, match=r"audios\[0\] must be \(frames,\) or \(frames, channels\)"):
        processor.encode_conversation(speech, audios=[np.stack([WAVE, WAVE])[None]])
    with pytest.raises(ValueError, match=r"audios\[0\] must hold float samples"):
        processor.encode_conversation(speech, audios=[(WAVE * 1000).astype(np.int16)])
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer"):
        processor.encode_conversation(speech, audios=[WAVE], sampling_rate=0)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        processor.encode_conversation([{"from": "human", "value": "<image>"}], [IMAGE[..., 0]])
    with pytest.raises(ValueError, match="image placeholder positions"):
        model.embed(processor.encode_conversation([{"from": "human", "value": "<image>"}], [IMAGE])["input_ids"][None])
    with pytest.raises(FileNotFoundError, match="omnifast_config.json"):
        OmniModel.from_pretrained(tmp_path)
    config = OmniConfig.tiny()
    config.speech_decoder["llm_hidden"] = 99
    with pytest.raises(ValueError, match="LLM hidden size"):
        config.validate()
    config = OmniConfig.tiny()
    config.image_token_id = 5
    with pytest.raises(ValueError, match="ids"):
        OmniProcessor(build_tiny_tokenizer(), config)


def test_siglip_vision_tower():
    import dataclasses

    config = dataclasses.replace(
        OmniConfig.tiny(),
        vision_type="siglip",
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(1)
    model = OmniModel(config)
    processor = OmniProcessor(build_tiny_tokenizer(), config)
    batch = processor(CONVERSATIONS[1:2], images=[[IMAGE]])
    assert type(model.vision).__name__ == "SiglipVisionModel"
    assert model.encode_images(batch["pixel_values"]).shape == (1, config.image_tokens, config.hidden)
    model(**batch).loss.backward()
    assert model.image_projector[0].weight.grad.abs().sum() > 0


def test_generate_with_forced_tokens_emits_them_and_speaks():
    from omnifast.models import OmniConfig, OmniModel

    torch.manual_seed(0)
    model = OmniModel(OmniConfig.tiny()).eval()
    forced = [5, 9, 11, 3, 7, 2]
    out = model.generate(torch.tensor([1, 2, 3]), speak=True, unit_chunk=2, forced_tokens=forced)
    assert out.token_ids == forced and out.total_s > 0


@pytest.mark.parametrize("mode", ["autocast-bf16", "autocast-fp16", "bf16-params"])
def test_mixed_precision_forward_and_backward(mode):
    """Text and speech-decoder losses within a stated tolerance of float32 (bf16: 5e-2 relative,
    fp16: 1e-2), gradients in their parameters' dtype."""
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    processor = OmniProcessor(build_tiny_tokenizer(), config)
    batch = processor(CONVERSATIONS, **MEDIA)
    units = torch.randint(0, 20, (4, 10), generator=torch.Generator().manual_seed(1))
    batch, units = moved(batch, DEVICE), units.to(DEVICE)
    exact_model = OmniModel(config).to(DEVICE)
    exact = exact_model(**batch, units=units)
    model = OmniModel(config).to(DEVICE)
    model.load_state_dict(exact_model.state_dict())
    half = torch.float16 if mode.endswith("fp16") else torch.bfloat16
    context = torch.autocast(DEVICE.type, dtype=half)
    if mode == "bf16-params":
        model = model.to(half)
        batch = {k: v.to(half) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        context = torch.autocast(DEVICE.type, enabled=False)
    with context:
        out = model(**batch, units=units)
    out.loss.backward()
    tolerance = 1e-2 if half == torch.float16 else 5e-2
    for name in ("text_loss", "speech_loss"):
        ours, truth = getattr(out, name), getattr(exact, name)
        assert ours.dtype == torch.float32 and abs(ours.item() - truth.item()) <= tolerance * abs(truth.item()), name
    for p in model.parameters():
        assert p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all())
