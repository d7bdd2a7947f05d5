"""A run that goes wrong says so: a non-finite loss stops it before the update with one line and a
non-zero exit, keeping the last good checkpoint and writing no model; a checkpoint's tensor files
belong to its state.json; a damaged newest checkpoint names the step ``--resume-from`` continues
from; a signal lets the step finish, writes a checkpoint and exits naming it, and the resumed run
equals an uninterrupted one. The metrics carry TRL's and torchtitan's names, go to TensorBoard
when asked, and held-out evaluations (with the best checkpoint kept) join them. Options that
cannot apply are refused by name."""

import json
import signal
import subprocess
import sys
import time

import pytest

from omnifast import cli
from omnifast.training import CheckpointError, get_stage, latest_checkpoint, load_records, read_metrics

from .test_training import assert_same_weights_bit_for_bit

ARGS = ["--model", "tiny", "--epochs", "8", "--no-progress"]


def train(data_dir, out, stage="speech-gen", *extra):
    return cli.main(
        [
            "train",
            "--stage",
            stage,
            *ARGS,
            "--data",
            str(data_dir / f"{stage}.json"),
            "--out",
            str(out),
            *map(str, extra),
        ]
    )


def console(data_dir, out, *extra, stage="speech-gen"):
    return cli.console(
        [
            "train",
            "--stage",
            stage,
            *ARGS,
            "--data",
            str(data_dir / f"{stage}.json"),
            "--out",
            str(out),
            *map(str, extra),
        ]
    )


def test_a_diverging_run_stops_at_that_step_keeps_its_checkpoint_and_writes_no_model(data, tmp_path, capsys):
    assert console(data, tmp_path / "run", "--lr", "1e30", "--max-steps", 6, "--save-every", 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 2: the loss is" in err[0] and "training stopped before the update" in err[0]
    assert "step-00000001" in err[0]  # the last checkpoint, named
    assert not (tmp_path / "run" / "model").exists()
    assert [c.name for c in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000001"]
    assert console(data, tmp_path / "wd", "--weight-decay", "1e30", "--max-steps", 6) == 1


def test_tensor_files_belong_to_their_state_json(data, tmp_path):
    for name in ("a", "b"):
        assert train(data, tmp_path / name, "speech-gen", "--max-steps", 4, "--save-every", 2, "--keep", 2) == 0
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    (a / "trainable.safetensors").write_bytes((b / "trainable.safetensors").read_bytes())  # same shapes, other run
    with pytest.raises(CheckpointError, match="not written with this checkpoint's state.json"):
        train(data, tmp_path / "a", "speech-gen", "--max-steps", 6, "--save-every", 2, "--resume")
    earlier = tmp_path / "b" / "checkpoints" / "step-00000002"
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):  # step 2's files under step 4's
        (b / name).write_bytes((earlier / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"--resume-from 2 continues from step 2"):
        train(data, tmp_path / "b", "speech-gen", "--max-steps", 6, "--save-every", 2, "--resume")


def test_a_damaged_newest_checkpoint_is_reported_and_resume_from_continues_from_an_earlier_one(data, tmp_path):
    args = ["--max-steps", 6, "--save-every", 2, "--keep", 3]
    assert train(data, tmp_path / "straight", "speech-gen", *args) == 0
    assert train(data, tmp_path / "run", "speech-gen", "--max-steps", 6, "--save-every", 2, "--keep", 3) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step-00000006").rename(checkpoints / "step-00000006.aside")
    (checkpoints / "step-00000004").rename(checkpoints / "step-99999999")
    (checkpoints / "step-99999999" / "state.json").write_text("garbage")
    (tmp_path / "run" / "model").rename(tmp_path / "run" / "old-model")
    with pytest.raises(CheckpointError, match=r"not valid JSON.*earlier ones are at steps \[2\]: --resume-from 2"):
        train(data, tmp_path / "run", "speech-gen", *args, "--resume")
    with pytest.raises(FileNotFoundError, match="has no checkpoint of step 3"):
        train(data, tmp_path / "run", "speech-gen", *args, "--resume-from", 3)
    assert train(data, tmp_path / "run", "speech-gen", *args, "--resume-from", 2) == 0
    assert (checkpoints / "step-99999999.superseded").is_dir()  # set aside, not removed
    assert_same_weights_bit_for_bit(tmp_path / "straight", tmp_path / "run")


def test_a_signal_finishes_the_step_writes_a_checkpoint_and_the_resumed_run_is_the_same(data, tmp_path):
    args = [
        "--stage",
        "speech-gen",
        *ARGS,
        "--data",
        str(data / "speech-gen.json"),
        "--max-steps",
        "60",
        "--epochs",
        "60",
        "--save-every",
        "1000",
    ]
    command = [sys.executable, "-m", "omnifast.cli", "train", *args]
    process = subprocess.Popen(command + ["--out", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").is_file():
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = [e for e in err.splitlines() if e.startswith("omnifast:")]
    assert len(line) == 1 and "SIGTERM: stopped after step" in line[0], err[-2000:]
    found = latest_checkpoint(tmp_path / "run")
    assert found is not None and str(found) in line[0] and not (tmp_path / "run" / "model").exists()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == int(found.name[5:]) < 60
    assert cli.main(["train", *args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert cli.main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    assert_same_weights_bit_for_bit(tmp_path / "straight", tmp_path / "run")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGUSR1"])
def test_each_stop_signal_is_recorded_and_a_second_one_stops_at_once(sig):
    import os

    from omnifast.training.signals import stop_requests

    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGTERM", "SIGUSR1")}
    with stop_requests() as stops:
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(0.01)
        assert stops.received == sig
        with pytest.raises(KeyboardInterrupt, match="a second"):
            os.kill(os.getpid(), getattr(signal, sig))
            time.sleep(0.01)
    assert {name: signal.getsignal(getattr(signal, name)) for name in before} == before  # the handlers are put back


def test_metrics_carry_the_fields_names_and_dpo_rewards_and_go_to_tensorboard(data, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    assert train(data, tmp_path / "gen", "speech-gen", "--max-steps", 4, "--warmup-ratio", 0.5) == 0
    rows = read_metrics(tmp_path / "gen" / "metrics.jsonl")
    for key in ("loss", "lr", "grad_norm", "throughput(tps)", "data_loading(%)"):
        assert all(key in row for row in rows), key
    assert rows[0]["lr"] > 0 and rows[-1]["lr"] > 0  # the rate each step used: never the next step's 0
    assert rows[0]["lr"] < rows[1]["lr"]  # the first warm-up rate is logged
    assert (
        train(
            data,
            tmp_path / "dpo",
            "emotion-dpo",
            "--max-steps",
            3,
            "--model",
            str(tmp_path / "gen" / "model"),
            "--report-to",
            "tensorboard",
            "--sft-weight",
            0.5,
        )
        == 0
    )
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert all(isinstance(row[key], float) for row in rows), key
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at the first step
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    # the sparse path (no SFT term) never forms the per-side normaliser: margins and accuracies only
    assert (
        train(data, tmp_path / "sparse", "emotion-dpo", "--max-steps", 2, "--model", str(tmp_path / "gen" / "model"))
        == 0
    )
    row = read_metrics(tmp_path / "sparse" / "metrics.jsonl")[-1]
    assert "rewards/margins" in row and "rewards/accuracies" in row and "rewards/chosen" not in row
    assert list((tmp_path / "dpo" / "runs").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="report_to: unknown sinks \\['mlflow'\\]"):
        train(data, tmp_path / "x", "speech-gen", "--report-to", "mlflow")


def test_held_out_evaluation_is_logged_and_the_best_checkpoint_kept(data, tmp_path):
    assert (
        train(
            data,
            tmp_path / "gen",
            "speech-gen",
            "--max-steps",
            6,
            "--eval-data",
            data / "speech-gen.json",
            "--eval-every",
            2,
            "--save-every",
            1,
            "--keep",
            1,
            "--keep-best",
            "eval/loss",
        )
        == 0
    )
    rows = read_metrics(tmp_path / "gen" / "metrics.jsonl")
    evaluated = [row for row in rows if "eval/loss" in row]
    assert [row["step"] for row in evaluated] == [2, 4, 6]
    assert all(0 <= row["eval/unit_error_rate"] for row in evaluated)
    best = min(evaluated, key=lambda row: row["eval/loss"])
    kept = sorted(p.name for p in (tmp_path / "gen" / "checkpoints").iterdir())
    assert f"step-{best['step']:08d}" in kept and "step-00000006" in kept
    record = json.loads((tmp_path / "gen" / "checkpoints" / "step-00000006" / "best.json").read_text())
    assert record["step"] == best["step"] and record["value"] == pytest.approx(best["eval/loss"])
    assert (
        train(
            data,
            tmp_path / "dpo",
            "emotion-dpo",
            "--max-steps",
            2,
            "--model",
            str(tmp_path / "gen" / "model"),
            "--eval-data",
            data / "emotion-dpo.json",
        )
        == 0
    )
    last = read_metrics(tmp_path / "dpo" / "metrics.jsonl")[-1]
    assert 0 <= last["eval/rewards/accuracies"] <= 1 and "eval/rewards/margins" in last


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--allow-changed-run"], "--allow-changed-run applies to a resumed run"),
        (["--fsdp"], "--fsdp shards across processes"),
        (["--eval-every", "2"], "pass --eval-data FILE"),
        (["--keep-best", "loss"], "keep_best must name a held-out metric"),
    ],
)
def test_options_that_cannot_apply_are_refused_by_name(data, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train(data, tmp_path / "run", "speech-gen", *extra)
    assert not (tmp_path / "run").exists()


def test_training_a_media_encoder_on_records_without_that_media_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="--trains vision: no record of stage 's2t' has images"):
        train(data, tmp_path / "run", "s2t", "--trains", "vision,speech_projector")
    assert not (tmp_path / "run").exists()


def test_component_learning_rates(data, tmp_path):
    from omnifast.training.config import TrainConfig

    config = TrainConfig(stage="s2t", component_lr="speech_projector=2e-3, llm=1e-4").validate()
    assert config.component_lr == {"speech_projector": 2e-3, "llm": 1e-4}
    with pytest.raises(ValueError, match=r"component_lr: unknown components \['ears'\]"):
        TrainConfig(stage="s2t", component_lr="ears=1e-3").validate()
    with pytest.raises(ValueError, match="component_lr\\[llm\\] must be a number > 0"):
        TrainConfig(stage="s2t", component_lr={"llm": -1.0}).validate()
    assert (
        train(
            data,
            tmp_path / "run",
            "s2t",
            "--trains",
            "speech_projector,llm",
            "--component-lr",
            "llm=1e-5",
            "--lr",
            "1e-3",
            "--max-steps",
            1,
        )
        == 0
    )
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    groups = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert groups == {"speech_projector": 1e-3, "llm": 1e-5}


def test_ddp_searches_for_unused_parameters_only_where_a_batch_can_leave_some(data):
    from omnifast.training import distributed

    s2t = load_records(data / "s2t.json", get_stage("s2t"))
    sft = load_records(data / "i2t-sft.json", get_stage("i2t-sft"))
    assert not distributed.may_leave_unused(("speech_projector",), s2t)  # every record has speech
    assert not distributed.may_leave_unused(("llm", "image_projector", "vision"), sft)  # and here every one a picture
    mixed = list(sft) + list(load_records(data / "speech-gen.json", get_stage("speech-gen")))
    assert distributed.may_leave_unused(("llm", "vision"), mixed)  # a text-only batch leaves vision unused
    assert not distributed.may_leave_unused(("llm",), mixed)
