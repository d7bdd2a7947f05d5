"""The held-out measurements a preference stage is judged by: TRL's DPO rewards on chosen /
rejected pairs (zero against the policy itself, the sign of a real preference otherwise), and the
emotion the decoder's speech is heard in (its units through a vocoder, judged by a classifier)."""

import copy

import numpy as np
import pytest
import torch

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.training import get_stage, load_records
from omnifast.training.evaluate import emotion_accuracy, preference_metrics, response_text, response_units

from .test_training import UNITS, write_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    model, processor = OmniModel(config).eval(), OmniProcessor(build_tiny_tokenizer(), config)
    data = write_data(tmp_path_factory.mktemp("data"))
    return model, processor, load_records(data / "emotion-dpo.json", get_stage("emotion-dpo"), UNITS)


def test_rewards_against_the_policy_itself_are_zero_and_follow_a_preference(setup):
    model, processor, records = setup
    same = preference_metrics(model, processor, records, copy.deepcopy(model))
    assert same == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0}
    pair = copy.copy(records[0])
    pair.tgt_units, pair.re_tgt_units = [3] * 6, [4] * 6
    preferring = copy.deepcopy(model)  # a head that makes unit 3 likelier and unit 4 less likely
    with torch.no_grad():
        preferring.speech_decoder.head.bias[3] += 2.0
        preferring.speech_decoder.head.bias[4] -= 2.0
    found = preference_metrics(preferring, processor, [pair], model, beta=0.5)
    assert found["rewards/chosen"] > 0 > found["rewards/rejected"] and found["rewards/accuracies"] == 1.0
    assert found["rewards/margins"] == pytest.approx(found["rewards/chosen"] - found["rewards/rejected"])


class ByLength:
    """A stand-in classifier: long clips are 'happy', short ones 'sad'."""

    styles = ["neutral", "happy", "sad", "angry"]

    def __init__(self, threshold):
        self.threshold = threshold

    def predict(self, waves, texts):
        assert len(texts) == len(waves) and all(isinstance(t, str) for t in texts)
        return ["happy" if len(w) >= self.threshold else "sad" for w in waves]


class Silent:
    """A stand-in vocoder: one sample per unit."""

    def synthesize_many(self, unit_lists):
        return [np.zeros(len(units), np.float32) for units in unit_lists]


def test_emotion_accuracy_counts_what_the_classifier_hears(setup):
    model, processor, records = setup
    units = response_units(model, processor, records)
    assert len(units) == len(records) and response_text(records[0]) == "it is red"
    threshold = sorted(len(u) for u in units)[len(units) // 2]
    found = emotion_accuracy(model, processor, records, Silent(), ByLength(threshold))
    happy = sum(len(u) >= threshold for u in units)  # every record's emotion is happy
    assert found["correct"] == happy and found["accuracy"] == happy / len(records) and found["n"] == len(records)
    assert found["predicted"] == {"neutral": 0, "happy": happy, "sad": len(records) - happy, "angry": 0}
    no_emotion = copy.copy(records[0])
    no_emotion.emotion = None
    with pytest.raises(ValueError, match="needs records with an emotion"):
        emotion_accuracy(model, processor, [no_emotion], Silent(), ByLength(threshold))
