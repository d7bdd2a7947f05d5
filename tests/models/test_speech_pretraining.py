"""Pretraining the speech encoder by CTC (the ``speech-pretrain`` stage): the loss is
``F.ctc_loss`` of the transcript's tokens on the CTC head over each clip's own frames (in
float64), SpecAugment masks only in training and as Whisper's config asks, the frames a clip fills
follow its length, and the stage trains the encoder and its head alone, through the trainer."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnifast.models import IGNORE_INDEX, OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.models.omni import spec_augment

WAVES = [(np.random.default_rng(i).standard_normal(n) * 0.1).astype(np.float32) for i, n in enumerate((5000, 16000))]
TEXTS = ("hi there", "a red circle")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    config.speech_ctc = True
    return OmniModel(config).double(), OmniProcessor(build_tiny_tokenizer(), config)


def transcripts(processor):
    return processor(
        [[{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": t}] for t in TEXTS],
        audios=[[w] for w in WAVES],
    )


def test_the_loss_is_torchs_ctc_on_each_clips_own_frames(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).eval()
    batch = transcripts(processor)
    assert batch["speech_lengths"].tolist() == [16, 50]  # 5000 samples: 32 mel frames, 16 positions; 1 s: the window
    special = processor.tokenizer.all_special_ids
    loss = model.speech_ctc_loss(batch["speech_features"], batch["labels"], special, batch["speech_lengths"])
    frames = model.speech(batch["speech_features"].double()).last_hidden_state
    log_probs = model.speech_ctc_head(frames).log_softmax(-1).transpose(0, 1)
    targets = [torch.tensor(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    expected = F.ctc_loss(
        log_probs,
        torch.cat(targets),
        batch["speech_lengths"],
        torch.tensor([len(t) for t in targets]),
        blank=log_probs.shape[-1] - 1,
        reduction="sum",
        zero_infinity=True,
    ) / sum(map(len, targets))
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-9, atol=1e-9)


def test_spec_augment_masks_in_training_only_and_as_configured(tiny):
    model, processor = tiny
    features = transcripts(processor)["speech_features"].double()
    settings = dict(
        mask_time_prob=0.0,
        mask_time_length=10,
        mask_time_min_masks=2,
        mask_feature_prob=0.0,
        mask_feature_length=4,
        mask_feature_min_masks=1,
    )
    torch.manual_seed(0)
    masked = spec_augment(features, settings)
    for row in range(features.shape[0]):
        changed = masked[row] != features[row]
        columns, rows = changed.all(0).sum(), changed.all(1).sum()
        assert 10 <= columns <= 20 and 1 <= rows <= 4  # 2 time spans of 10, 1 band span of 4 (they may overlap)
        assert (masked[row][changed] == 0).all()
    model = copy.deepcopy(model)
    model.config.speech.update(apply_spec_augment=True, **settings)
    model.eval()
    torch.testing.assert_close(model.speech_frames(features), model.speech(features).last_hidden_state)
    model.train()
    model.speech.config.dropout = 0.0
    assert not torch.allclose(model.speech_frames(features), model.speech(features).last_hidden_state)


def test_the_stage_trains_the_encoder_and_its_head_alone(tiny, tmp_path):
    from omnifast.audio import write_audio
    from omnifast.training import TrainConfig, Trainer, get_stage, load_records

    model, processor = tiny
    rows = []
    for i, (wave, text) in enumerate(zip(WAVES * 4, TEXTS * 4)):
        write_audio(tmp_path / f"c{i}.wav", wave, 16000)
        rows.append(
            {
                "id": f"r{i}",
                "speech": f"c{i}.wav",
                "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": text}],
            }
        )
    (tmp_path / "data.json").write_text(json.dumps(rows))
    stage = get_stage("speech-pretrain")
    records = load_records(tmp_path / "data.json", stage, audio_seconds=1, sampling_rate=16000)
    model = copy.deepcopy(model).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(stage="speech-pretrain", batch_size=4, epochs=6, lr=3e-3, progress=False, save_every=100)
    Trainer(model, processor, records, config, tmp_path / "out").train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"speech", "speech_ctc_head"}
    with pytest.raises(ValueError, match="packing"):
        Trainer(
            model,
            processor,
            records,
            TrainConfig(stage="speech-pretrain", packing=True, progress=False),
            tmp_path / "packed",
        )


def test_a_model_without_the_head_is_refused_with_the_way_to_add_it(tmp_path):
    from omnifast import cli
    from omnifast.audio import write_audio

    write_audio(tmp_path / "c.wav", WAVES[0], 16000)
    (tmp_path / "data.json").write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "speech": "c.wav",
                    "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "hi"}],
                }
            ]
        )
    )
    with pytest.raises(
        ValueError,
        match=r"speech_ctc_head, which this model does not have \(build it with "
        r"OmniConfig.speech_ctc=True\)",
    ):
        cli.main(
            [
                "train",
                "--stage",
                "speech-pretrain",
                "--model",
                "tiny",
                "--data",
                str(tmp_path / "data.json"),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
    assert IGNORE_INDEX == -100
