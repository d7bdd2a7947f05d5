"""Audio is read at its own rate: one signal rendered at other rates, in stereo and in every
supported format gives the features of its 16 kHz mono rendering (within resampling and codec
tolerance), and every unreadable, cut-short or too-long file is a DataError naming the file, the
record and the field before the first step."""

import json

import numpy as np
import pytest
import soundfile
import torch

from omnifast import cli
from omnifast.audio import AudioError, audio_info, read_audio, resample, write_audio
from omnifast.models import OmniConfig, OmniProcessor, build_tiny_tokenizer
from omnifast.training import DataError, get_stage, load_records
from omnifast.training.loader import ConversationDataset

SECONDS = 0.8


def signal(rate: int, channels: int = 1) -> np.ndarray:
    """48 sines from 100 Hz to 7 kHz, amplitude-modulated: broadband, and the same at any rate."""
    t = np.arange(int(rate * SECONDS)) / rate
    rng = np.random.default_rng(0)
    tones = zip(np.geomspace(100, 7000, 48), rng.uniform(0, 2 * np.pi, 48))
    wave = sum(0.03 * np.sin(2 * np.pi * f * t + phase) for f, phase in tones) * (0.6 + 0.4 * np.sin(6 * np.pi * t))
    wave = wave.astype(np.float32)
    return np.stack([wave] * channels, 1) if channels > 1 else wave


# name: (rate, channels, format, subtype, largest and mean feature difference allowed)
RENDERINGS = {
    "44k.wav": (44100, 1, "WAV", "PCM_16", 0.02, 1e-3),
    "24k.wav": (24000, 1, "WAV", "PCM_16", 0.02, 1e-3),
    "stereo.wav": (16000, 2, "WAV", "PCM_16", 0.01, 1e-4),
    "stereo-48k.flac": (48000, 2, "FLAC", "PCM_24", 0.02, 1e-3),
    "16k.flac": (16000, 1, "FLAC", "PCM_16", 0.01, 1e-4),
    "44k.mp3": (44100, 1, "MP3", "MPEG_LAYER_III", 0.15, 0.02),
    "16k.ogg": (16000, 1, "OGG", "VORBIS", 0.1, 0.02),
    "pcm8.wav": (16000, 1, "WAV", "PCM_U8", 0.1, 0.01),
    "pcm24.wav": (16000, 1, "WAV", "PCM_24", 1e-3, 1e-5),
    "float.wav": (16000, 1, "WAV", "FLOAT", 1e-6, 1e-7),
}


@pytest.fixture(scope="module")
def processor():
    config = OmniConfig.tiny()
    return OmniProcessor(build_tiny_tokenizer(), config)


@pytest.fixture(scope="module")
def renderings(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for name, (rate, channels, kind, subtype, *_) in RENDERINGS.items():
        soundfile.write(root / name, signal(rate, channels), rate, format=kind, subtype=subtype)
    return root


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_every_rendering_gives_the_features_of_the_16k_mono_signal(processor, renderings, name):
    rate, channels, *_, worst, mean = RENDERINGS[name]
    info = audio_info(renderings / name)
    assert (info.rate, info.channels) == (rate, channels)
    samples, got_rate = read_audio(renderings / name, 16000)
    assert got_rate == 16000 and samples.ndim == 1 and abs(len(samples) - 16000 * SECONDS) <= 2
    reference = processor.audio_to_features([signal(16000)])[0]
    features = processor.audio_to_features([samples])[0]
    difference = (features - reference).abs()
    assert float(difference.max()) < worst and float(difference.mean()) < mean, (name, float(difference.max()))


def test_the_dataset_resamples_each_file_from_its_own_rate(processor, renderings, tmp_path):
    """A 44.1 kHz stereo clip in a record: the features the model gets are those of the signal
    at 16 kHz, not of 2.2x as many samples taken as 16 kHz."""
    rows = [
        {
            "id": "a",
            "speech": str(renderings / "stereo-48k.flac"),
            "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "hi"}],
        }
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    records = load_records(
        tmp_path / "d.json", get_stage("s2t"), media_roots=[renderings], audio_seconds=1, sampling_rate=16000
    )
    item = ConversationDataset(records, processor)[0]
    reference = processor.audio_to_features([signal(16000)])
    assert float((item["speech_features"] - reference).abs().max()) < 0.02


def test_resample_and_write(tmp_path):
    wave = signal(16000)
    torch.testing.assert_close(
        torch.from_numpy(resample(resample(wave, 16000, 48000), 48000, 16000)[200:-200]),
        torch.from_numpy(wave[200:-200]),
        atol=2e-3,
        rtol=0,
    )
    write_audio(tmp_path / "w.wav", wave, 16000)
    back, rate = read_audio(tmp_path / "w.wav")
    assert rate == 16000 and np.abs(back - wave).max() < 1e-4
    with pytest.raises(ValueError, match="target must be a positive integer"):
        resample(wave, 16000, 0)
    with pytest.raises(AudioError, match="no sampling rate of its own"):
        np.save(tmp_path / "c.npy", wave)
        read_audio(tmp_path / "c.npy")


def write_bad_files(root, renderings):
    (root / "good.wav").write_bytes((renderings / "16k.flac").read_bytes())  # a FLAC named .wav reads fine
    (root / "text.wav").write_text("not audio at all")
    flac = (renderings / "16k.flac").read_bytes()
    (root / "cut.flac").write_bytes(flac[: len(flac) // 2])
    soundfile.write(root / "long.wav", np.zeros(16000 * 2, np.float32), 16000)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "ok.png")
    png = (root / "ok.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "bad.npy").write_bytes(b"\x93NUMPY garbage")


def test_every_bad_media_file_is_named_with_its_record_and_field_before_step_one(renderings, tmp_path):
    write_bad_files(tmp_path, renderings)

    def row(rid, speech=None, image=None):
        ask = ("<speech>" if speech else "") + ("<image>" if image else "")
        out = {"id": rid, "conversations": [{"from": "human", "value": ask}, {"from": "gpt", "value": "x"}]}
        if speech:
            out["speech"] = speech
        if image:
            out["image"] = image
        return out

    rows = [
        row("r0", "good.wav"),
        row("r1", "text.wav"),
        row("r2", "cut.flac"),
        row("r3", "long.wav"),
        row("r4", image="cut.png"),
        row("r5", "bad.npy"),
        row("r6", "../outside.wav"),
        row("r7", "/etc/hostname"),
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        cli.main(
            [
                "train",
                "--stage",
                "s2t",
                "--model",
                "tiny",
                "--data",
                str(tmp_path / "data.json"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    message = str(error.value)
    for expected in (
        f"record r1: speech: {tmp_path / 'text.wav'}: not audio",
        f"record r2: speech: {tmp_path / 'cut.flac'}: cut short",
        f"record r3: speech: {tmp_path / 'long.wav'}: 2.00 s of audio is longer than the model's 1 s",
        f"record r4: image: {tmp_path / 'cut.png'}: not a readable image",
        f"record r5: speech: {tmp_path / 'bad.npy'}: not a readable .npy",
        "record r6: speech: ../outside.wav is outside the data folder",
        "record r7: speech: /etc/hostname is outside the data folder",
    ):
        assert expected in message, expected
    assert "record r0:" not in message and message.startswith("8 problem(s)")  # r4 also lacks its speech
    assert not out.exists()
