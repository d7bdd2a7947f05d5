"""The demo corpus: every stage's records pass the trainer's validation, the held-out records are
really held out, and the styles differ on the audio as their names say."""

import json

import numpy as np
import pytest

from omnifast.audio import read_audio
from omnifast.demo import corpus as demo_corpus
from omnifast.training.data import load_records
from omnifast.training.stages import BY_NAME


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo_corpus.build_corpus(tmp_path_factory.mktemp("cache"), progress=False)


def rows(root, name):
    return json.loads((root / name).read_text())


def clips(record):
    """The record's speech clips: one path, or a list of them (one per spoken turn)."""
    speech = record.get("speech", [])
    return [speech] if isinstance(speech, str) else speech


def test_build_is_cached_and_records_validate(built):
    assert demo_corpus.build_corpus(built.parent, progress=False) == built  # found, not rebuilt
    for name in ("llm-pretrain", "s2t", "i2t-pretrain", "i2t-sft"):
        assert len(load_records(built / f"{name}.json", BY_NAME[name])) > 50
    for name in ("eval-s2t", "eval-vqa-text", "eval-vqa-speech", "eval-vqa-caption-speech"):
        assert len(load_records(built / f"{name}.json", BY_NAME["i2t-sft"])) > 20


def test_units_are_filled_from_clips(built, tmp_path):
    lengths = {}

    def encode(path):
        lengths[path.name] = read_audio(path, 16000)[0].size // 640
        return [7] * lengths[path.name]

    path = demo_corpus.with_units(built, "emotion-dpo", encode, tmp_path, limit=40)
    records = load_records(path, BY_NAME["emotion-dpo"], unit_vocab=8)
    anchors = {r.id for r in records if r.id.startswith("dpo-anchor-")}
    assert len(records) == 40 and 0 < len(anchors) < 40
    for r in records:
        if r.id in anchors:  # a prompt that asks for no emotion: its neutral units, chosen and rejected
            assert r.emotion == "neutral" and r.tgt_units == r.re_tgt_units
        else:
            assert r.emotion in demo_corpus.EMOTIONS
            assert len(r.tgt_units) != len(r.re_tgt_units) or r.emotion == "angry"  # the styles change the length
    raw = rows(built, "emotion-dpo.pending.json")[0]
    assert all(f"-{raw['emotion']}.wav" in p for p in raw["units_from"])
    assert all(p.endswith("-neutral.wav") for p in raw["rejected_units_from"])


def test_held_out_records_are_held_out(built):
    train_text = {
        json.dumps(r["conversations"])
        for name in ("s2t", "i2t-pretrain", "i2t-sft", "llm-pretrain")
        for r in rows(built, f"{name}.json")
    }
    train_images = {r.get("image") for name in ("i2t-pretrain", "i2t-sft") for r in rows(built, f"{name}.json")}
    train_audio = {
        clip for name in ("speech-pretrain", "s2t") for r in rows(built, f"{name}.json") for clip in clips(r)
    }
    for r in rows(built, "eval-vqa-speech.json") + rows(built, "eval-vqa-text.json"):
        assert r["image"] not in train_images
    spoken = rows(built, "eval-vqa-speech.json") + rows(built, "eval-vqa-caption-speech.json")
    for r in spoken + rows(built, "eval-s2t.json"):
        for clip in clips(r):
            assert clip not in train_audio and f"-{demo_corpus.EVAL_VOICE[3:]}-" in clip
    for r in rows(built, "eval-s2t.json"):
        assert json.dumps(r["conversations"]) not in train_text  # unseen captions
    for r in rows(built, "eval-vqa-caption-speech.json"):
        assert json.dumps(r["conversations"]) not in train_text  # captions of unseen pictures
    # the Whisper stand-in hears each picture question in every pretraining voice and style
    heard = [r["conversations"][-1]["value"] for r in rows(built, "speech-pretrain.json")]
    for question in demo_corpus.QUESTIONS:
        assert heard.count(question) == len(demo_corpus.PRETRAIN_VOICES) * len(demo_corpus.STYLES)
    # no training file pairs a picture with speech: the spoken-question VQA is never trained on
    for name in ("s2t", "i2t-pretrain", "i2t-sft"):
        assert not any("image" in r and "speech" in r for r in rows(built, f"{name}.json"))
    said = {r["conversations"][-1]["value"] for r in rows(built, "speech-gen.pending.json")}
    assert not said & {r["conversations"][-1]["value"] for r in rows(built, "eval-t2s.pending.json")}
    dpo = rows(built, "emotion-dpo.pending.json")
    assert not {r["conversations"][-1]["value"] for r in dpo} & {
        r["conversations"][-1]["value"] for r in rows(built, "eval-t2s.pending.json")
    }
    statements = {r["conversations"][0]["value"] for r in dpo}
    assert not statements & {r["conversations"][0]["value"] for r in rows(built, "eval-emotion.pending.json")}
    tokenizer_clips = rows(built, "tokenizer/metadata.json")
    assert tokenizer_clips and all(c["voice"] != demo_corpus.EVAL_VOICE for c in tokenizer_clips)


def mean_pitch(samples):
    import librosa

    f0, voiced, _ = librosa.pyin(samples, fmin=60, fmax=500, sr=16000, frame_length=1024)
    return float(np.nanmean(f0[voiced]))


def test_corpus_styles_differ_on_the_audio(built):
    """Mean pitch happy > neutral > sad, sad slowest, angry loudest: on the corpus' own clips."""
    clips = [c for c in rows(built, "tokenizer/metadata.json") if c["voice"] == demo_corpus.UNIT_VOICE]
    text = next(c["text"] for c in clips if c["emotion"] == "sad" and sum(d["text"] == c["text"] for d in clips) == 4)
    audio = {c["emotion"]: read_audio(built / "tokenizer" / c["audio"], 16000)[0] for c in clips if c["text"] == text}
    pitch = {style: mean_pitch(wave) for style, wave in audio.items()}
    assert pitch["happy"] > pitch["neutral"] > pitch["sad"], pitch
    assert audio["sad"].size == max(w.size for w in audio.values())
    loudness = {style: np.sqrt(np.mean(wave**2)) for style, wave in audio.items()}
    assert max(loudness, key=loudness.get) == "angry", loudness
