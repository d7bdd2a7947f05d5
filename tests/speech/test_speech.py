"""The speech tokenizer and unit vocoder on a synthetic corpus: tones spelling characters, at two
pitches. Shapes and the 25 Hz frame rate, a short training run lowering both losses, the vocoder,
save/load, the CLI and every bad input."""

import json
import wave

import numpy as np
import pytest
import torch

from omnifast import cli
from omnifast.speech import SpeechTokenizer, SpeechTokenizerConfig, UnitVocoder, load_corpus, train_tokenizer
from omnifast.speech.train import config_for

RATE = 16000
TONES = {"a": 300.0, "b": 450.0, "c": 600.0, "d": 800.0}


def spell(text: str, pitch: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factor = 1.0 if pitch == "low" else 1.6
    pieces = []
    for char in text:
        t = np.arange(int(0.12 * RATE)) / RATE
        pieces.append(0.3 * np.sin(2 * np.pi * TONES[char] * factor * t) * np.hanning(t.size))
    return (np.concatenate(pieces) + 0.003 * rng.standard_normal(sum(p.size for p in pieces))).astype(np.float32)


def write_corpus(root, clips: int = 24):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        text = "".join(rng.choice(list(TONES), int(rng.integers(3, 7))))
        pitch = ["low", "high"][i % 2]
        samples = (spell(text, pitch, i) * 32767).astype(np.int16)
        with wave.open(str(root / f"c{i}.wav"), "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(RATE)
            handle.writeframes(samples.tobytes())
        rows.append({"audio": f"c{i}.wav", "text": text, "pitch": pitch})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(write_corpus(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    torch.manual_seed(0)
    return SpeechTokenizer(config_for(corpus, SpeechTokenizerConfig.tiny()))


def test_units_come_at_25_hz_and_decode_to_mel_frames(tokenizer):
    units, style = tokenizer.encode(np.zeros(2 * RATE, dtype=np.float32) + 0.01)
    assert units.shape == (50,) and units.dtype == torch.int64 and 0 <= units.min() and units.max() < 4096
    assert style.shape == (tokenizer.config.style_dim,) and tokenizer.config.frame_rate == 25.0
    mel = tokenizer.decode(units, style)
    assert mel.shape == (tokenizer.config.n_mels, 200)


def test_training_lowers_the_acoustic_and_semantic_losses(corpus):
    torch.manual_seed(1)
    model = SpeechTokenizer(config_for(corpus, SpeechTokenizerConfig.tiny()))
    history = train_tokenizer(model, corpus, steps=40, batch_size=8, lr=3e-3, progress=False)
    first, last = history[:5], history[-5:]
    for key in ("mel", "ctc", "style"):
        assert np.mean([h[key] for h in last]) < 0.8 * np.mean([h[key] for h in first]), key
    units, _ = model.encode(corpus[0]["wave"])
    assert units.unique().numel() > 1  # the codes did not saturate onto one unit


def test_vocoder_waveform_length_rate_and_style_centroids(tokenizer, corpus):
    vocoder = UnitVocoder(tokenizer, n_iter=4).fit_centroids(
        [r["wave"] for r in corpus[:6]], {"pitch": [r["pitch"] for r in corpus[:6]]}
    )
    units, _ = tokenizer.encode(corpus[0]["wave"])
    samples, rate = vocoder.synthesize(units, pitch="high")
    assert rate == RATE and samples.dtype == np.float32 and samples.shape == (units.numel() * 4 * 160,)
    assert np.isfinite(samples).all()
    with pytest.raises(ValueError, match="unknown pitch 'medium'"):
        vocoder.synthesize(units, pitch="medium")
    with pytest.raises(ValueError, match="unknown style label 'mood'"):
        vocoder.synthesize(units, mood="happy")


def test_save_load_round_trip(tokenizer, corpus, tmp_path):
    vocoder = UnitVocoder(tokenizer).fit_centroids([corpus[0]["wave"]], {"pitch": ["low"]})
    vocoder.save_pretrained(tmp_path)
    loaded = UnitVocoder.from_pretrained(tmp_path)
    a, b = tokenizer.encode(corpus[1]["wave"]), loaded.tokenizer.encode(corpus[1]["wave"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(loaded.style_for(pitch="low"), vocoder.style_for(pitch="low"))
    assert loaded.tokenizer.config.vocabulary == tokenizer.config.vocabulary


def test_bad_audio_and_units(tokenizer):
    one_second = np.zeros(RATE, dtype=np.float32)
    with pytest.raises(ValueError, match="sampled at 16000 Hz, got 22050 Hz; pass resample=True"):
        tokenizer.encode(one_second, sampling_rate=22050)
    units, _ = tokenizer.encode(np.zeros(22050, dtype=np.float32), sampling_rate=22050, resample=True)
    assert units.numel() == 25
    with pytest.raises(ValueError, match="mono"):
        tokenizer.encode(np.zeros((2, RATE), dtype=np.float32))
    with pytest.raises(ValueError, match="shorter than one unit"):
        tokenizer.encode(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="shorter than one unit"):
        tokenizer.encode(np.zeros(500, dtype=np.float32))
    nan = one_second.copy()
    nan[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tokenizer.encode(nan)
    with pytest.raises(ValueError, match="float samples"):
        tokenizer.encode(np.zeros(RATE, dtype=np.int16))
    with pytest.raises(ValueError, match="codebook"):
        tokenizer.decode(torch.tensor([1, 4096]), torch.zeros(tokenizer.config.style_dim))
    with pytest.raises(ValueError, match="unknown style label 'mood'"):
        tokenizer.label_index("mood", "happy")


def test_cli_trains_saves_and_reports(tmp_path):
    data = write_corpus(tmp_path / "corpus", clips=10)
    assert (
        cli.main(
            [
                "tokenizer",
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "out"),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    evaluation = report["evaluation"]
    assert "cer" in evaluation and set(evaluation["pitch"]) == {"from_units", "from_style", "chance"}
    assert UnitVocoder.from_pretrained(tmp_path / "out").style_for(pitch="low").shape == (16,)


def test_a_units_only_tokenizer_carries_the_pitch_in_its_units(corpus, tmp_path):
    """OpenOmni's mode (style_dim=0): no style branch; the units alone decode, and after a short
    training the round trip keeps each clip's pitch."""
    torch.manual_seed(2)
    model = SpeechTokenizer(config_for(corpus, SpeechTokenizerConfig.tiny(style_dim=0)))
    assert not hasattr(model, "style_encoder") and not hasattr(model, "from_style")
    train_tokenizer(model, corpus, steps=150, batch_size=8, lr=3e-3, progress=False)

    def centre(mel):  # the mean mel band, weighted towards the loud ones
        weights = torch.softmax(4 * mel, 0)
        return float((torch.arange(mel.shape[0])[:, None] * weights).sum(0).mean())

    heard, decoded = [], []
    for row in corpus:
        units, style = model.encode(row["wave"])
        assert style.shape == (0,)
        mel, frames = model.mel([row["wave"]])
        heard.append(centre(mel[0, :, : frames[0]]))
        decoded.append(centre(model.decode(units)))
    assert np.corrcoef(heard, decoded)[0, 1] > 0.8, (heard, decoded)
    vocoder = UnitVocoder(model, n_iter=4).fit_centroids([corpus[0]["wave"]], {"pitch": ["low"]})
    assert vocoder.centroids == {}
    waves = vocoder.synthesize_many([units.tolist(), [], units[:3].tolist()])
    assert [w.size for w in waves] == [units.numel() * 640, 0, 3 * 640] and all(np.isfinite(w).all() for w in waves)
    with pytest.raises(ValueError, match="speaks from units alone"):
        vocoder.synthesize(units, pitch="low")
    vocoder.save_pretrained(tmp_path)
    loaded = UnitVocoder.from_pretrained(tmp_path)
    assert loaded.tokenizer.config.style_dim == 0
    torch.testing.assert_close(loaded.tokenizer.decode(units), model.decode(units))
    with pytest.raises(ValueError, match="decodes units with a style vector"):
        SpeechTokenizer(config_for(corpus, SpeechTokenizerConfig.tiny())).decode(units)
