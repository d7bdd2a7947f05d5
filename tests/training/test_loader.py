"""Records in bounded memory and micro-batches from workers: a JSON list or JSON Lines file read
back record by record (blocks cut anywhere, non-ASCII text, records of any size), the order of the
micro-batches a function of (seed, epoch, step) alone, and workers changing nothing, resumed runs
included."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnifast import cli
from omnifast.training import DataError, MicroBatches, data_file, get_stage, load_records
from omnifast.training import checkpoint as checkpoints

STAGE = get_stage("speech-gen")


def rows(n: int):
    return [
        {
            "id": f"r{i}",
            "tgt_units": " ".join(map(str, range(i % 7 + 1))),
            "emotion": "sad" if i % 3 else None,
            "conversations": [
                {"from": "human", "value": f'question {i} {"é" * (i % 4)} "quoted" \\ {{'},
                {"from": "gpt", "value": "ü" * (i % 5) + f"answer {i}" + "x" * (i * 37 % 300)},
            ],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("layout", ["list", "indented", "lines"])
@pytest.mark.parametrize("block", [7, 64, 4096])
def test_every_record_reads_back_whatever_the_block_size(tmp_path, monkeypatch, layout, block):
    monkeypatch.setattr(data_file, "READ_BYTES", block)
    expected = rows(40)
    path = tmp_path / ("data.jsonl" if layout == "lines" else "data.json")
    if layout == "lines":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in expected) + "\n\n")
    else:
        path.write_text(json.dumps(expected, ensure_ascii=False, indent=2 if layout == "indented" else None))
    records = load_records(path, STAGE, 10)
    assert len(records) == 40
    for record, row in zip(records, expected):
        assert record.id == row["id"] and record.conversations == row["conversations"]
        assert record.tgt_units == [int(u) for u in row["tgt_units"].split()] and record.emotion == row["emotion"]
    assert list(records.units) == [i % 7 + 1 for i in range(40)]
    assert records[-1].id == "r39" and [r.id for r in records[2:4]] == ["r2", "r3"]


def test_malformed_files_and_duplicate_ids_are_reported(tmp_path):
    cases = {
        "cut.json": '[{"id": "a", "conversations": []}, {"id": ',
        "open.json": '[{"id": "a"}',
        "comma.json": '[{"id": "a"} {"id": "b"}]',
        "object.json": '{"id": "a"}',
        "bad.jsonl": '{"id": "a"}\nnot json\n',
        "empty.json": "  \n",
    }
    messages = {
        "cut.json": "not JSON at byte",
        "open.json": "the list is not closed",
        "comma.json": "expected ',' or ']'",
        "object.json": "got a JSON object",
        "bad.jsonl": "line 2: not JSON",
        "empty.json": "empty file",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=messages[name]):
            load_records(tmp_path / name, STAGE)
    twice = rows(3) + [rows(2)[1]]
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(DataError, match="record r1: id: appears more than once"):
        load_records(tmp_path / "twice.json", STAGE)
    many = [{"id": f"x{i}", "conversations": "bad"} for i in range(500)]
    (tmp_path / "many.json").write_text(json.dumps(many))
    with pytest.raises(DataError, match=r"500 problem\(s\)[\s\S]*and 300 more") as error:
        load_records(tmp_path / "many.json", STAGE)
    assert str(error.value).count("\n") < 210


def test_micro_batches_depend_on_seed_epoch_and_step_alone():
    one = MicroBatches(23, 6, seed=3, stop=12)
    two = [MicroBatches(23, 3, seed=3, rank=r, world=2, stop=12) for r in range(2)]
    for micro, batch in enumerate(one):
        assert [index for index, _ in batch] == two[0].indices(micro) + two[1].indices(micro)
        assert {epoch for _, epoch in batch} == {micro // one.per_epoch}
    epoch = [i for micro in range(one.per_epoch) for i in one.indices(micro)]
    assert sorted(epoch) == list(range(23))
    assert one.indices(one.per_epoch) != one.indices(0)  # a new permutation each epoch
    assert [[i for i, _ in b] for b in MicroBatches(23, 6, seed=3, start=5, stop=9)] == [
        one.indices(m) for m in range(5, 9)
    ]
    assert list(MicroBatches(23, 6, seed=4, stop=2)) != list(MicroBatches(23, 6, seed=3, stop=2))


def test_workers_change_nothing_even_across_a_resume(data, tmp_path, monkeypatch):
    """Six steps with two worker processes, interrupted at the second checkpoint and resumed,
    end with the weights of six steps without workers, bit for bit."""
    args = [
        "train",
        "--stage",
        "s2t",
        "--model",
        "tiny",
        "--data",
        str(data / "s2t.json"),
        "--max-steps",
        "6",
        "--epochs",
        "6",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert cli.main(args + ["--workers", "0", "--out", str(tmp_path / "plain")]) == 0
    calls = []

    def fail_at_the_second_save(step):
        calls.append(step)
        if step == "rename" and calls.count(step) == 2:
            raise OSError("injected")

    monkeypatch.setattr(checkpoints, "STEP_HOOK", fail_at_the_second_save)
    with pytest.raises(OSError, match="injected"):
        cli.main(args + ["--workers", "2", "--out", str(tmp_path / "workers")])
    monkeypatch.setattr(checkpoints, "STEP_HOOK", None)
    assert cli.main(args + ["--workers", "2", "--out", str(tmp_path / "workers"), "--resume"]) == 0
    a = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "workers" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    waits = [
        row["data_loading(%)"]
        for row in map(json.loads, (tmp_path / "workers" / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(waits) == 6 and np.all(np.isfinite(waits)) and all(0 <= w <= 100 for w in waits)
