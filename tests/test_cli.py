"""The console command: a user's error is one line and exit status 2 (the traceback only under
--debug), ``omnifast chat`` answers in text and speech (streamed or whole), every printed metric
names its unit, and ``bench`` writes outside the package sources."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from omnifast import cli
from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer


def console(capsys, *argv):
    status = cli.console([str(a) for a in argv])
    return status, capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--stage", "s2t", "--data", "missing.json", "--out", "run"], "missing.json"),
        (["train", "--stage", "s2t", "--data", "missing.json", "--out", "run", "--lr", "nan"], "lr must be finite"),
        (
            ["eval", "--stage", "s2t", "--model", "no-such-model", "--data", "x.json"],
            "--model must be one of tiny, small",
        ),
        (["chat", "--model", "tiny", "--wav", "no-such.wav"], "--wav no-such.wav: no such file"),
        (["chat", "--model", "tiny", "--text", "hi", "--style", "happy"], "--style takes LABEL=VALUE"),
    ],
)
def test_a_users_error_is_one_line_and_exit_status_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    status, out = console(capsys, *argv)
    assert status == 2 and message in out.err, out.err
    assert out.err.startswith("omnifast: error: ") and out.err.count("\n") == 1 and "Traceback" not in out.err
    with pytest.raises(Exception, match=message.split(":")[0]):
        cli.console(["--debug", *argv])


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnifast.cli",
            "train",
            "--stage",
            "s2t",
            "--data",
            str(tmp_path / "none.json"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "none.json" in done.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    OmniModel(config).save_pretrained(root / "model", OmniProcessor(build_tiny_tokenizer(), config))
    return root


def vocoder(root):
    from omnifast.speech import SpeechTokenizer, SpeechTokenizerConfig, UnitVocoder

    torch.manual_seed(0)
    tokenizer = SpeechTokenizer(SpeechTokenizerConfig.tiny())
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(2)]
    voc = UnitVocoder(tokenizer, n_iter=2).fit_centroids(clips, {"emotion": ["happy", "sad"]})
    voc.save_pretrained(root / "vocoder")
    return root / "vocoder"


def test_chat_answers_text_and_writes_speech_streamed_or_whole(saved, capsys, tmp_path):
    voc = vocoder(tmp_path)
    streamed, whole = tmp_path / "streamed.wav", tmp_path / "whole.wav"
    for out, extra in ((streamed, ["--stream", "--style", "emotion=happy"]), (whole, [])):
        status, printed = console(
            capsys,
            "chat",
            "--model",
            saved / "model",
            "--text",
            "hi",
            "--vocoder",
            voc,
            "--max-new-tokens",
            12,
            "--out",
            out,
            *extra,
        )
        assert status == 0, printed.err
        assert f"speech: {out}" in printed.out
    samples, rate = soundfile.read(str(streamed))
    again, _ = soundfile.read(str(whole))
    assert rate == 16000 and samples.size > 0 and again.size > 0
    status, printed = console(
        capsys,
        "chat",
        "--model",
        saved / "model",
        "--text",
        "hi",
        "--vocoder",
        voc,
        "--max-new-tokens",
        6,
        "--out",
        tmp_path / "a.wav",
        "--stream",
    )
    assert status == 0 and "first token after" in printed.err and "first audio after" in printed.err


def test_chat_takes_a_spoken_question_and_prints_units_without_a_vocoder(saved, capsys, tmp_path):
    question = tmp_path / "question.flac"
    soundfile.write(str(question), (0.1 * np.random.default_rng(0).standard_normal(20000)).astype(np.float32), 22050)
    status, printed = console(capsys, "chat", "--model", saved / "model", "--wav", question, "--max-new-tokens", 6)
    assert status == 0 and ("units (" in printed.out or "no units were made" in printed.out)
    long = tmp_path / "long.wav"
    soundfile.write(str(long), np.zeros(3 * 16000, dtype=np.float32), 16000)
    status, printed = console(capsys, "chat", "--model", saved / "model", "--wav", long)
    assert status == 2 and "longer than the model's 1 s speech window" in printed.err


def test_the_vocoder_says_nothing_for_no_units(tmp_path):
    from omnifast.speech import UnitVocoder

    voc = UnitVocoder.from_pretrained(vocoder(tmp_path))
    samples, rate = voc.synthesize([], voc.average_style())
    assert samples.shape == (0,) and samples.dtype == np.float32 and rate == 16000


def test_eval_prints_each_metric_with_its_unit(capsys):
    from omnifast.training.evaluate import UNITS, describe

    text = describe({"cer": 0.25, "accuracy": 0.5})
    assert text.splitlines() == [f"cer = 0.2500 ({UNITS['cer']})", f"accuracy = 0.5000 ({UNITS['accuracy']})"]
    assert "fraction" in UNITS["cer"]


def test_bench_results_go_to_the_current_folder_not_the_sources(tmp_path, monkeypatch):
    import omnifast
    from benchmarks import _harness

    monkeypatch.chdir(tmp_path)
    assert not _harness.RESULTS.is_absolute()
    package = __import__("pathlib").Path(omnifast.__file__).resolve().parent
    assert package not in _harness.RESULTS.resolve().parents
    status = cli.main(["bench", "data_scale", "--records", "2000", "--out", str(tmp_path / "here")])
    assert status == 0 and json.loads((tmp_path / "here" / "data_scale.json").read_text())["op"] == "data_scale"
