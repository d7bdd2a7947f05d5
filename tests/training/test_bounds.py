"""Absurd sizes and odd records are refused before any work, by name: more workers than CPUs,
accumulation past the run's micro-batches, counts past 32-bit indices, epochs by the billion
(counted in no time), records with more units or text than the model takes, a JSON file nested
100,000 deep, an integer or empty id, an empty answer, a NUL byte in a media path, a folder as
the data file; ``chat`` refuses more new tokens than positions and ``--out`` without a vocoder;
a full disk is one line, with nothing half written left behind."""

import errno
import json

import pytest

from omnifast import cli
from omnifast.training import DataError, get_stage, load_records

from .test_training import UNITS


def train(data_dir, out, *extra, stage="speech-gen"):
    return cli.main(
        [
            "train",
            "--stage",
            stage,
            "--model",
            "tiny",
            "--data",
            str(data_dir / f"{stage}.json"),
            "--out",
            str(out),
            "--no-progress",
            *map(str, extra),
        ]
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--workers", 1000000], "workers=1000000: this machine has"),
        (["--grad-accum", 10**6], "grad_accum=1000000: the run has only"),
        (["--grad-accum", 10**30], "grad_accum must be an integer <="),
        (["--batch-size", 2**40], "batch_size must be an integer <="),
        (["--max-tokens", 10**30], "max_tokens must be an integer <="),
    ],
)
def test_absurd_sizes_are_refused_before_any_work(data, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train(data, tmp_path / "run", *extra)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_billion_epochs_capped_by_max_steps_start_at_once(data, tmp_path):
    assert train(data, tmp_path / "run", "--epochs", 10**9, "--max-steps", 1) == 0
    assert train(data, tmp_path / "budget", "--epochs", 10**9, "--max-steps", 1, "--max-tokens", 400) == 0


def write(tmp_path, rows, name="data.json"):
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name


def turns(answer="it is red"):
    return [{"from": "human", "value": "say it"}, {"from": "gpt", "value": answer}]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"id": 7, "conversations": turns()}, 'id: must be a non-empty string, got the int 7 \\(write it as "7"\\)'),
        ({"id": " ", "conversations": turns()}, "id: must be a non-empty string, got empty"),
        ({"id": "a", "conversations": turns("  ")}, "a gpt turn is empty"),
        ({"id": "a", "conversations": turns("x" * 1_000_000)}, "1000006 bytes of text, more than this model can take"),
        (
            {
                "id": "a",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}],
                "image": "pic\x00.png",
            },
            "has a NUL byte: not a path",
        ),
        (
            {"id": "a", "conversations": turns(), "tgt_units": [1] * 200_000},
            "200000 units, more than the speech decoder's",
        ),
    ],
)
def test_records_the_model_cannot_take_are_refused_with_their_id(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        load_records(write(tmp_path, [row]), get_stage("speech-gen"), UNITS, max_units=4096, max_positions=2048)


def test_a_deeply_nested_file_and_a_folder_are_refused_by_name(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError, match="nested too deeply"):
        load_records(deep, get_stage("s2t"))
    lines = tmp_path / "deep.jsonl"
    lines.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 1: nested too deeply"):
        load_records(lines, get_stage("s2t"))
    with pytest.raises(DataError, match="a folder, not a data file"):
        load_records(tmp_path, get_stage("s2t"))


def test_chat_refuses_what_it_cannot_do(data, tmp_path, capsys):
    assert train(data, tmp_path / "run", "--max-steps", 1) == 0
    model = str(tmp_path / "run" / "model")
    assert cli.console(["chat", "--model", model, "--text", "hi", "--max-new-tokens", str(10**30)]) == 2
    assert "the question takes" in capsys.readouterr().err
    assert cli.console(["chat", "--model", model, "--text", "hi", "--out", str(tmp_path / "a.wav")]) == 2
    assert "--out writes the spoken answer, which needs --vocoder" in capsys.readouterr().err
    assert not (tmp_path / "a.wav").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(data, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from omnifast.training import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    status = cli.console(
        [
            "train",
            "--stage",
            "speech-gen",
            "--model",
            "tiny",
            "--data",
            str(data / "speech-gen.json"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--max-steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "no space left on the device to write" in err[0], err
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    assert checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints") == []
