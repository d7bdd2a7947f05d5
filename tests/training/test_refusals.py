"""Nothing wrong goes through silently: every option is checked before any work, a checkpoint is
checked against the run before anything is copied from it, a resume with other data or options
is refused unless asked for, media paths and tokenizer folders cannot run code, and a run without
matplotlib still finishes."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnifast import cli
from omnifast.models import OmniConfig, OmniModel
from omnifast.training import CheckpointError, latest_checkpoint

ARGS = [
    "--stage",
    "speech-gen",
    "--model",
    "tiny",
    "--max-steps",
    "4",
    "--epochs",
    "4",
    "--save-every",
    "2",
    "--no-progress",
]


def train(data_dir, out, *extra):
    return cli.main(["train", *ARGS, "--data", str(data_dir / "speech-gen.json"), "--out", str(out), *map(str, extra)])


@pytest.mark.parametrize(
    "option, value, error, match",
    [
        ("--max-grad-norm", -1, ValueError, "max_grad_norm must be a number > 0"),
        ("--max-grad-norm", 0, ValueError, "max_grad_norm must be a number > 0"),
        ("--max-grad-norm", "nan", ValueError, "max_grad_norm must be finite"),
        ("--lr", "nan", ValueError, "lr must be finite"),
        ("--lr", "inf", ValueError, "lr must be finite"),
        ("--sft-weight", "inf", ValueError, "sft_weight must be finite"),
        ("--beta", "inf", ValueError, "beta must be finite"),
        ("--beta", -1, ValueError, "beta must be a number > 0"),
        ("--warmup-ratio", "nan", ValueError, "warmup_ratio must be finite"),
        ("--warmup-ratio", -3, ValueError, "warmup_ratio must be a number >= 0"),
        ("--epochs", 0, ValueError, "epochs must be an integer >= 1"),
        ("--epochs", -2, ValueError, "epochs must be an integer >= 1"),
        ("--max-steps", -1, ValueError, "max_steps must be an integer >= 1"),
        ("--speech-prob", 2, ValueError, "speech_prob must be a number <= 1"),
    ],
)
def test_every_bad_option_is_refused_by_name_before_any_work(data, tmp_path, option, value, error, match):
    with pytest.raises(error, match=match):
        train(data, tmp_path / "run", option, value)
    assert not (tmp_path / "run").exists()


def test_bad_choices_and_yaml_types_are_refused(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(data, tmp_path / "run", "--bf16", "maybe")
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    (tmp_path / "options.yaml").write_text("batch_size: 2.5\n")
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        train(data, tmp_path / "run", "--config", tmp_path / "options.yaml")


def tamper(found: Path, edit):
    state = json.loads((found / "state.json").read_text())
    edit(state)
    (found / "state.json").write_text(json.dumps(state))


@pytest.fixture
def finished(data, tmp_path):
    assert train(data, tmp_path / "run") == 0
    return tmp_path / "run", latest_checkpoint(tmp_path / "run")


@pytest.mark.parametrize(
    "step, match",
    [(-5, "step must be an integer"), (10**6, "step must be an integer"), (3.7, "step must be an integer")],
)
def test_a_step_out_of_range_is_refused(data, finished, step, match):
    out, found = finished
    tamper(found, lambda s: s.update(step=step))
    with pytest.raises(CheckpointError, match=match):
        train(data, out, "--resume")


def test_a_tampered_optimizer_lr_is_refused(data, finished):
    out, found = finished

    def edit(state):
        state["optimizer"]["param_groups"][0]["lr"] = 1e6

    tamper(found, edit)
    with pytest.raises(CheckpointError, match="lr 1000000.0, not the schedule's"):
        train(data, out, "--resume")


@pytest.mark.parametrize(
    "change, match",
    [
        ("scalar", "has shape \\(\\), the run's is"),
        ("one key", "does not hold exactly this run's trainable tensors"),
        ("nan", "holds NaN or infinite values"),
        ("exp_avg", "optimizer state .* has shape"),
    ],
)
def test_tensors_that_do_not_fit_the_run_are_refused(data, finished, change, match):
    out, found = finished
    weights = load_file(str(found / "trainable.safetensors"))
    name = sorted(weights)[0]
    if change == "scalar":
        weights[name] = torch.tensor(1.0)
    elif change == "one key":
        weights = {name: weights[name]}
    elif change == "nan":
        weights[name] = weights[name].clone().fill_(math.nan)
    if change == "exp_avg":
        moments = load_file(str(found / "optimizer.safetensors"))
        key = next(k for k in moments if k.endswith("exp_avg"))
        moments[key] = torch.zeros(3)
        resave(found / "optimizer.safetensors", moments)
    else:
        resave(found / "trainable.safetensors", weights)
    with pytest.raises(CheckpointError, match=match):
        train(data, out, "--resume")


def resave(path, tensors):
    """Rewrite a checkpoint's tensor file with new contents and its own tie (a file damaged in place)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata)


def test_only_step_folders_are_checkpoints_and_deep_json_is_refused(data, finished):
    out, found = finished
    copy = found.with_name(found.name + " (copy)")
    copy.mkdir()
    assert latest_checkpoint(out) == found
    (found / "state.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        train(data, out, "--resume")


def test_resuming_with_other_data_or_options_is_refused_unless_asked(data, tmp_path):
    assert train(data, tmp_path / "run", "--max-steps", 2) == 0
    for extra, match in (
        (["--lr", "0.5"], "lr changed from None to 0.5"),
        (["--batch-size", "1"], "batch_size changed from 2 to 1"),
        (["--seed", "9"], "seed changed from 0 to 9"),
    ):
        with pytest.raises(CheckpointError, match=match):
            train(data, tmp_path / "run", "--max-steps", 2, "--resume", *extra)
    rows = json.loads((data / "speech-gen.json").read_text())
    edited = tmp_path / "edited"
    edited.mkdir()
    for item in data.iterdir():
        if item.suffix != ".json":
            (edited / item.name).write_bytes(item.read_bytes())
    rows[1]["tgt_units"] = "1 2 3"
    (edited / "speech-gen.json").write_text(json.dumps(rows))
    with pytest.raises(CheckpointError, match="the data .* changed"):
        train(edited, tmp_path / "run", "--max-steps", 2, "--resume")
    assert train(edited, tmp_path / "run", "--max-steps", 4, "--resume", "--allow-changed-run") == 0


def test_config_settings_are_an_explicit_list_and_tokenizers_run_no_code(tmp_path):
    config = OmniConfig.tiny()
    config.llm["attn_implementation"] = "kernels-community/flash-attn"
    with pytest.raises(ValueError, match="OmniConfig.llm: attn_implementation are not Qwen2Config settings"):
        OmniConfig.from_dict(config.to_dict())
    from omnifast.models import OmniProcessor, build_tiny_tokenizer

    folder = tmp_path / "tokenizer"
    OmniProcessor(build_tiny_tokenizer(), OmniConfig.tiny()).save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["planted.Tokenizer", None]}  # a folder asking to run its code
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "planted.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n"
        "from transformers import PreTrainedTokenizerFast as Tokenizer\n"
    )
    OmniProcessor.from_pretrained(folder, OmniConfig.tiny())
    assert not (tmp_path / "ran").exists()


def test_a_run_without_matplotlib_finishes_and_says_so(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train(data, tmp_path / "run", "--max-steps", 1) == 0
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / "loss.png").exists()
    assert "not drawn: matplotlib is not installed" in capsys.readouterr().err
    assert OmniModel.from_pretrained(tmp_path / "run" / "model") is not None


def test_units_no_ctc_path_fits_are_refused_for_dpo_and_named_for_stage_4(data, tmp_path):
    """CTC emits a unit per frame and needs a blank between equal neighbours: 25 equal units need
    49 frames, more than the tiny decoder makes for a short answer (3 x its tokens)."""
    from omnifast.training import DataError

    repeated = " ".join(["3"] * 25)
    for stage, key in (("emotion-dpo", "tgt_units"), ("speech-gen", "tgt_units")):
        rows = json.loads((data / f"{stage}.json").read_text())
        rows.append({**rows[0], "id": "too-many-repeats", key: repeated})
        path = tmp_path / f"{stage}.json"
        path.write_text(json.dumps(rows))
        for row in rows:  # media paths are relative to the data file
            for field in ("speech", "image"):
                if field in row:
                    (tmp_path / row[field]).write_bytes((data / row[field]).read_bytes())
        args = ["train", "--stage", stage, "--model", "tiny", "--data", str(path), "--out", str(tmp_path / stage)]
        args += ["--max-steps", "1", "--no-progress"]
        if stage == "emotion-dpo":
            with pytest.raises(
                DataError, match="record too-many-repeats: tgt_units: 25 units with 24 equal neighbours need 49"
            ):
                cli.main(args)
            assert not (tmp_path / stage / "checkpoints").exists()  # refused before step 1
        else:
            with pytest.warns(UserWarning, match="1 record\\(s\\) have units no CTC path fits; their loss is zero"):
                assert cli.main(args) == 0
