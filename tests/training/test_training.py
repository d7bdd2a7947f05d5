"""The five stages on a tiny model and a tiny data set written here: losses fall, each stage
trains exactly its components, a killed run resumes to the same weights, two gloo processes match
one, and every data and argument error is reported before training."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnifast import cli
from omnifast.models import COMPONENTS, OmniModel
from omnifast.training import STAGES, DataError, get_stage, load_records, read_metrics

from ..tolerances import assert_close

UNITS = 20


def write_wav(path: Path, seconds: float, seed: int) -> None:
    samples = (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(samples.tobytes())


def write_data(root: Path, records: int = 4) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "black"]
    data = {stage.name: [] for stage in STAGES}
    for i in range(records):
        write_wav(root / f"a{i}.wav", 0.5, i)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"i{i}.png")
        units = " ".join(map(str, rng.integers(0, UNITS, 6)))  # equal lengths: see the 2-process test
        other = " ".join(map(str, rng.integers(0, UNITS, 6)))
        answer = f"it is {colours[i]}"
        data["s2t"].append(
            {
                "id": f"s{i}",
                "speech": f"a{i}.wav",
                "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": answer}],
            }
        )
        data["i2t-pretrain"].append(
            {
                "id": f"p{i}",
                "image": f"i{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {colours[i]} picture"},
                ],
            }
        )
        data["i2t-sft"].append(
            {
                "id": f"f{i}",
                "image": f"i{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": colours[i]},
                ],
            }
        )
        data["speech-gen"].append(
            {
                "id": f"g{i}",
                "tgt_units": units,
                "conversations": [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": answer}],
            }
        )
        data["emotion-dpo"].append(
            {
                "id": f"d{i}",
                "tgt_units": units,
                "re_tgt_units": other,
                "emotion": "happy",
                "conversations": [{"from": "human", "value": "Say it happily."}, {"from": "gpt", "value": answer}],
            }
        )
    for name, rows in data.items():
        (root / f"{name}.json").write_text(json.dumps(rows))
    return root


def component_states(model_dir: Path):
    model = OmniModel.from_pretrained(model_dir)
    return {
        name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
        for name in COMPONENTS
        if getattr(model, name) is not None
    }


def train(*args) -> int:
    return cli.main(["train", *map(str, args), "--no-progress"])


def test_all_five_stages_lower_their_losses_and_train_only_their_components(data, tmp_path):
    assert (
        train(
            "--all",
            "--model",
            "tiny",
            "--data",
            data,
            "--out",
            tmp_path,
            "--max-steps",
            8,
            "--epochs",
            8,
            "--save-every",
            100,
        )
        == 0
    )
    previous = None
    for stage in STAGES:
        out = tmp_path / f"{stage.index}-{stage.name}"
        losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl")]
        assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), (stage.name, losses)
        assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoints" / "step-00000008").is_dir()
        after = component_states(out / "model")
        if previous is not None:
            for name in after:
                same = all(torch.equal(previous[name][k], after[name][k]) for k in after[name])
                assert same == (name not in stage.trains), (stage.name, name)
        previous = after


def kill_at_random_moments(command, out: Path, moments, env=None) -> None:
    """Start ``command``; once its first checkpoint exists, SIGKILL it (and its children) after a
    random delay; then start it with --resume and do the same, once per entry of ``moments``. At
    least the first kill must land before the run finishes."""
    for i, delay in enumerate(moments):
        process = subprocess.Popen(
            command + (["--resume"] if i else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "checkpoints").glob("step-*[0-9]")):
            time.sleep(0.02)
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if i == 0:
            assert not (out / "model").exists(), "the run finished before it could be killed"


def assert_same_weights_bit_for_bit(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model" / "model.safetensors"))
    b = load_file(str(b_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_killed_at_random_moments_a_run_resumes_to_the_same_weights_bit_for_bit(data, tmp_path):
    args = [
        "--stage",
        "speech-gen",
        "--model",
        "tiny",
        "--data",
        data / "speech-gen.json",
        "--max-steps",
        40,
        "--epochs",
        40,
        "--save-every",
        4,
        "--keep",
        2,
    ]
    assert train(*args, "--out", tmp_path / "straight") == 0
    command = [
        sys.executable,
        "-m",
        "omnifast.cli",
        "train",
        *map(str, args),
        "--out",
        str(tmp_path / "killed"),
        "--no-progress",
    ]
    moments = random.Random(0).sample([0.0, 0.05, 0.15, 0.3], 2)
    kill_at_random_moments(command, tmp_path / "killed", moments)
    assert train(*args, "--out", tmp_path / "killed", "--resume") == 0
    assert_same_weights_bit_for_bit(tmp_path / "straight", tmp_path / "killed")
    steps = [row["step"] for row in read_metrics(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == list(range(1, 41))
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # kept the last 2


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_gloo_processes_killed_and_resumed_match_an_uninterrupted_pair_bit_for_bit(data, tmp_path, sharding):
    common = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "omnifast.cli",
        "train",
        "--stage",
        "speech-gen",
        "--model",
        "tiny",
        "--data",
        str(data / "speech-gen.json"),
        "--max-steps",
        "24",
        "--epochs",
        "24",
        "--save-every",
        "4",
        "--batch-size",
        "1",
        "--no-progress",
        *sharding,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = 29600 + 10 * bool(sharding)
    port = lambda n: ["--master_port", str(base + n)]  # noqa: E731
    run = subprocess.run(
        [sys.executable, *common[:4], *port(0), *common[4:], "--out", str(tmp_path / "straight")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    killed = [sys.executable, *common[:4], *port(1), *common[4:], "--out", str(tmp_path / "killed")]
    kill_at_random_moments(killed, tmp_path / "killed", [random.Random(1).choice([0.0, 0.1, 0.3])], env)
    run = subprocess.run(
        [sys.executable, *common[:4], *port(2), *common[4:], "--out", str(tmp_path / "killed"), "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_weights_bit_for_bit(tmp_path / "straight", tmp_path / "killed")


def test_one_process_ddp_and_fsdp_train_alike_and_save_a_whole_model(data, tmp_path):
    """Six steps with the same global batch: one process with batch 2, and two gloo processes
    with batch 1 under DDP and under FSDP2 give the same losses (float32 tolerance), and each
    final model reloads with from_pretrained to the same weights."""
    common = [
        "train",
        "--stage",
        "speech-gen",
        "--model",
        "tiny",
        "--data",
        str(data / "speech-gen.json"),
        "--max-steps",
        "6",
        "--epochs",
        "6",
        "--save-every",
        "3",
        "--no-progress",
    ]
    assert cli.main(common + ["--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for port, (name, extra) in enumerate((("ddp", []), ("fsdp", ["--fsdp"]))):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(29533 + port),
                "-m",
                "omnifast.cli",
                *common,
                *extra,
                "--batch-size",
                "1",
                "--out",
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    losses = {
        name: [row["loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl")]
        for name in ("one", "ddp", "fsdp")
    }
    assert len(losses["one"]) == 6
    np.testing.assert_allclose(losses["ddp"], losses["one"], rtol=1e-5)
    np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=1e-5)
    one = OmniModel.from_pretrained(tmp_path / "one" / "model").state_dict()
    for name in ("ddp", "fsdp"):
        other = OmniModel.from_pretrained(tmp_path / name / "model").state_dict()
        assert other.keys() == one.keys()
        for key in one:
            assert_close(other[key], one[key], torch.float32, f"{name}: {key}")


def bad_data(tmp_path: Path, rows) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path


def test_every_bad_record_is_reported_at_once(data, tmp_path):
    (tmp_path / "a.wav").write_bytes((data / "a0.wav").read_bytes())
    rows = [
        {
            "id": "r1",
            "speech": "missing.wav",
            "tgt_units": "1 2",
            "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "r2",
            "tgt_units": "1 two 3",
            "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
        },
        {
            "id": "r3",
            "tgt_units": f"1 {UNITS}",
            "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
        },
        {
            "id": "r4",
            "speech": ["a.wav"],
            "tgt_units": "1",
            "conversations": [{"from": "human", "value": "<speech> <speech>"}, {"from": "gpt", "value": "b"}],
        },
        {"id": "r5", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    ]
    with pytest.raises(DataError) as error:
        load_records(bad_data(tmp_path, rows), get_stage("speech-gen"), UNITS)
    message = str(error.value)
    for expected in (
        "record r1: speech: missing file",
        "record r2: tgt_units: unparsable units",
        "record r3: tgt_units: unit out of range",
        "record r4: speech: 2 <speech> placeholders but 1 files",
        "record r5: tgt_units: required by stage 'speech-gen'",
        "bad.json",
    ):
        assert expected in message, expected
    with pytest.raises(DataError, match="re_tgt_units: required by stage 'emotion-dpo'"):
        load_records(data / "speech-gen.json", get_stage("emotion-dpo"), UNITS)
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.json", get_stage("s2t"))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(DataError, match="not JSON"):
        load_records(tmp_path / "text.json", get_stage("s2t"))
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(DataError, match="a JSON list"):
        load_records(tmp_path / "dict.json", get_stage("s2t"))


def test_argument_errors_come_before_any_training(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train("--stage", "s3t", "--data", data / "s2t.json", "--out", tmp_path)
    assert "invalid choice: 's3t'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown stage"):
        get_stage("s3t")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train("--stage", "s2t", "--data", data / "s2t.json", "--out", tmp_path / "fresh", "--resume")
    with pytest.raises(ValueError, match="no omnifast_config.json"):
        train("--stage", "s2t", "--model", tmp_path, "--data", data / "s2t.json", "--out", tmp_path / "x")
    tiny = tmp_path / "no-decoder"
    model = OmniModel(__import__("omnifast").models.OmniConfig.tiny())
    model.speech_decoder = None
    model.config.speech_decoder = None
    from omnifast.models import OmniProcessor, build_tiny_tokenizer

    model.save_pretrained(tiny, OmniProcessor(build_tiny_tokenizer(), model.config))
    with pytest.raises(ValueError, match="trains speech_decoder, which this model does not have"):
        train("--stage", "speech-gen", "--model", tiny, "--data", data / "speech-gen.json", "--out", tmp_path / "y")
    (tmp_path / "options.json").write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(ValueError, match="unknown training option keys"):
        train(
            "--stage",
            "s2t",
            "--data",
            data / "s2t.json",
            "--out",
            tmp_path / "z",
            "--config",
            tmp_path / "options.json",
        )
    for out in ("fresh", "x", "y", "z"):
        assert not (tmp_path / out / "metrics.jsonl").exists()


def test_eval_reports_each_stages_metric(data, tmp_path, capsys):
    assert (
        train(
            "--stage",
            "speech-gen",
            "--model",
            "tiny",
            "--data",
            data / "speech-gen.json",
            "--out",
            tmp_path,
            "--max-steps",
            1,
            "--save-every",
            100,
        )
        == 0
    )
    for stage, key in (
        ("s2t", "cer"),
        ("i2t-sft", "accuracy"),
        ("speech-gen", "unit_error_rate"),
        ("emotion-dpo", "rewards/accuracies"),
    ):
        assert (
            cli.main(
                [
                    "eval",
                    "--stage",
                    stage,
                    "--model",
                    str(tmp_path / "model"),
                    "--data",
                    str(data / f"{stage}.json"),
                    "--out",
                    str(tmp_path / f"{stage}.json"),
                ]
            )
            == 0
        )
        metrics = json.loads((tmp_path / f"{stage}.json").read_text())
        assert key in metrics and metrics[key] >= 0


def test_trains_overrides_the_stages_components(data, tmp_path):
    """``--trains speech,speech_projector``: stage 1 with the speech encoder unfrozen too."""
    from omnifast.training.run import load_model

    model = load_model("tiny", seed=0)[0]  # what --model tiny starts from
    before = {
        name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
        for name in COMPONENTS
        if getattr(model, name) is not None
    }
    assert (
        train(
            "--stage",
            "s2t",
            "--model",
            "tiny",
            "--data",
            data / "s2t.json",
            "--out",
            tmp_path,
            "--max-steps",
            2,
            "--trains",
            "speech,speech_projector",
            "--save-every",
            100,
        )
        == 0
    )
    after = component_states(tmp_path / "model")
    for name in after:
        same = all(torch.equal(before[name][k], after[name][k]) for k in after[name])
        assert same == (name not in ("speech", "speech_projector")), name
    with pytest.raises(ValueError, match=r"trains: unknown components \['ears'\]"):
        train("--stage", "s2t", "--data", data / "s2t.json", "--out", tmp_path / "x", "--trains", "speech,ears")
    assert not (tmp_path / "x").exists()


def test_sft_weight_adds_the_chosen_nll_to_ctc_dpo(data, tmp_path):
    """The first DPO step's loss is log 2 (policy = reference) plus sft_weight x the chosen NLL."""
    first = {}
    for weight in (0.0, 1.0):
        out = tmp_path / str(weight)
        assert (
            train(
                "--stage",
                "emotion-dpo",
                "--model",
                "tiny",
                "--data",
                data / "emotion-dpo.json",
                "--out",
                out,
                "--max-steps",
                1,
                "--sft-weight",
                weight,
                "--save-every",
                100,
            )
            == 0
        )
        first[weight] = read_metrics(out / "metrics.jsonl")[0]["loss"]
    assert first[0.0] == pytest.approx(np.log(2), abs=1e-4)
    assert first[1.0] > first[0.0] + 0.1
    with pytest.raises(ValueError, match="sft_weight must be a number >= 0, got -1.0"):
        train(
            "--stage", "emotion-dpo", "--data", data / "emotion-dpo.json", "--out", tmp_path / "x", "--sft-weight", -1
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("stage", ["speech-gen", "emotion-dpo"])
def test_bf16_autocast_trains_the_speech_stages_on_the_cpu(data, tmp_path, stage):
    """``--bf16 on`` (the trainer's default on a GPU) runs the stages the kernels exist for."""
    assert (
        train(
            "--stage",
            stage,
            "--model",
            "tiny",
            "--data",
            data / f"{stage}.json",
            "--out",
            tmp_path,
            "--max-steps",
            3,
            "--save-every",
            100,
            "--bf16",
            "on",
        )
        == 0
    )
    losses = [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses))
