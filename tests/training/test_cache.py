"""The state cache: a step from the cache equals the step without it (loss and every gradient) for
stages 4 and 5, NAR and AR; training from it never runs the frozen front; a cache refuses a run it
was not made for, naming what differs; a killed build finishes from its completed shards; spoken
and written forms of a record are both cached; two processes build one cache between them."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from omnifast import cli
from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.training import TrainConfig, Trainer, get_stage, load_records
from omnifast.training import cache as cache_module
from omnifast.training.cache import CacheError, StateCache, build_cache, collate_cached
from omnifast.training.loader import collate_batch

from .test_training import write_wav

UNITS = 20


def write_records(root, count=6, spoken=False):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        row = {
            "id": f"r{i}",
            "tgt_units": " ".join(str((i * 7 + k) % UNITS) for k in range(3 + 2 * i)),
            "re_tgt_units": " ".join(str((i * 3 + k) % UNITS) for k in range(4 + i)),
            "conversations": [
                {"from": "human", "value": f"say number {i}"},
                {"from": "gpt", "value": "it is " + "la " * (i + 1)},
            ],
        }
        if spoken:
            write_wav(root / f"q{i}.wav", 0.3, i)
            row["speech"] = f"q{i}.wav" if i % 3 else "none"
        rows.append(row)
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def tiny(mode="nar", seed=0):
    torch.manual_seed(seed)
    config = OmniConfig.tiny()
    config.speech_decoder_mode = mode
    return OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)


def loss_and_grads(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss(batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in trainer.model.speech_decoder.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("stage_name, mode", [("speech-gen", "nar"), ("emotion-dpo", "nar"), ("speech-gen", "ar")])
def test_a_step_from_the_cache_equals_the_step_without_it(tmp_path, stage_name, mode):
    """Float32 on the CPU. Equal within 1e-6 relative, not bit for bit: the cache runs the frozen
    LLM over other batches (length-sorted, another padding), and a row's states then differ from
    the training batch's by rounding in the matrix products."""
    stage = get_stage(stage_name)
    model, processor = tiny(mode)
    records = load_records(write_records(tmp_path), stage, UNITS)
    config = TrainConfig(stage=stage_name, batch_size=3, progress=False)
    cached_model = copy.deepcopy(model)
    plain = Trainer(model, processor, records, config, tmp_path / "plain")
    cached = Trainer(cached_model, processor, records, config, tmp_path / "cached", state_cache=tmp_path / "cache")
    for keys in ([(0, 0), (3, 0), (5, 0)], [(1, 0), (2, 0), (4, 0)]):
        loss_a, grads_a = loss_and_grads(plain, collate_batch([plain.dataset[k] for k in keys], 0))
        loss_b, grads_b = loss_and_grads(cached, collate_cached([cached.dataset[k] for k in keys]))
        assert abs(float(loss_a - loss_b)) <= 1e-6 * abs(float(loss_a)), (float(loss_a), float(loss_b))
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            scale = grads_a[name].abs().max().clamp(min=1e-12)
            assert float((grads_a[name] - grads_b[name]).abs().max() / scale) <= 1e-6, name


def test_training_from_the_cache_never_runs_the_frozen_front(tmp_path):
    model, processor = tiny()
    stage = get_stage("emotion-dpo")
    records = load_records(write_records(tmp_path), stage, UNITS)
    build_cache(tmp_path / "cache", model, processor, records, stage, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the frozen LLM ran")

    model.llm.model.forward = refuse
    trainer = Trainer(
        model,
        processor,
        records,
        TrainConfig(stage="emotion-dpo", max_steps=3, progress=False),
        tmp_path / "out",
        state_cache=tmp_path / "cache",
    )
    assert trainer.references is not None and len(trainer.references) == len(records)
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and abs(losses[0] - 0.693147) < 1e-4  # policy = reference at the first step


def test_a_cache_refuses_what_it_was_not_made_for(tmp_path):
    model, processor = tiny()
    stage = get_stage("speech-gen")
    path = write_records(tmp_path / "data")
    records = load_records(path, stage, UNITS)
    build_cache(tmp_path / "cache", model, processor, records, stage, progress=False)
    other_model, _ = tiny(seed=1)
    with pytest.raises(CacheError, match="the frozen llm weights"):
        build_cache(tmp_path / "cache", other_model, processor, records, stage, progress=False)
    rows = json.loads(path.read_text())
    rows[2]["conversations"][1]["value"] = "edited"
    path.write_text(json.dumps(rows))
    edited = load_records(path, stage, UNITS)
    with pytest.raises(CacheError, match=r"the data \(records or their media files\)"):
        Trainer(
            model,
            processor,
            edited,
            TrainConfig(stage="speech-gen", progress=False),
            tmp_path / "o",
            state_cache=tmp_path / "cache",
        )
    with pytest.raises(CacheError, match=r"bf16 \(False in the cache, True here\)"):
        StateCache.open(tmp_path / "cache", cache_module.fingerprint(model, processor, stage, records, True))
    with pytest.raises(CacheError, match="not a complete state cache"):
        StateCache.open(tmp_path / "nothing")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    (tmp_path / "cache" / index["shards"][0]).unlink()
    with pytest.raises(CacheError, match="listed in .* but missing"):
        StateCache.open(tmp_path / "cache")
    with pytest.raises(ValueError, match="serves the speech stages"):
        Trainer(
            model,
            processor,
            records,
            TrainConfig(stage="s2t", progress=False),
            tmp_path / "p",
            state_cache=tmp_path / "cache",
        )


def test_a_killed_build_finishes_from_its_completed_shards(tmp_path, monkeypatch):
    model, processor = tiny()
    stage = get_stage("emotion-dpo")
    records = load_records(write_records(tmp_path / "data", count=8), stage, UNITS)
    straight = build_cache(tmp_path / "straight", model, processor, records, stage, progress=False, max_tokens=40)
    monkeypatch.setattr(cache_module, "SHARD_BYTES", 1)  # a shard per batch
    flushes = []
    original = cache_module._ShardWriter.flush

    def killed_at_the_third_shard(self):
        flushes.append(1)
        if len(flushes) == 3:
            (tmp_path / "killed" / "shard-r0-00002.safetensors.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(cache_module._ShardWriter, "flush", killed_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "killed", model, processor, records, stage, progress=False, max_tokens=40)
    assert not (tmp_path / "killed" / "index.json").exists()
    with pytest.raises(CacheError, match="not a complete state cache"):
        StateCache.open(tmp_path / "killed")
    monkeypatch.setattr(cache_module._ShardWriter, "flush", original)
    finished = json.loads((tmp_path / "killed" / "progress-r0.json").read_text())["shards"]
    assert len(finished) == 2
    stamps = {name: os.stat(tmp_path / "killed" / name).st_mtime_ns for name in finished}
    resumed = build_cache(tmp_path / "killed", model, processor, records, stage, progress=False, max_tokens=40)
    assert {name: os.stat(tmp_path / "killed" / name).st_mtime_ns for name in finished} == stamps
    for position in range(len(records)):  # the resumed build batches what was left: other rounding
        for a, b in zip(straight.lookup(position, False), resumed.lookup(position, False)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert resumed.references.values.keys() == straight.references.values.keys()


def test_spoken_and_written_forms_are_both_cached_and_drawn_per_epoch(tmp_path):
    model, processor = tiny()
    stage = get_stage("speech-gen")
    records = load_records(
        write_records(tmp_path / "data", spoken=True), stage, UNITS, audio_seconds=1, sampling_rate=16000
    )
    assert [bool(r.spoken) for r in records] == [False, True, True, False, True, True]  # "none": written only
    cache = build_cache(tmp_path / "cache", model, processor, records, stage, progress=False)
    written, spoken = cache.lookup(1, False)[0], cache.lookup(1, True)[0]
    assert written.shape == spoken.shape and not torch.equal(written, spoken)
    trainer = Trainer(
        model,
        processor,
        records,
        TrainConfig(stage="speech-gen", progress=False, speech_prob=0.5),
        tmp_path / "out",
        state_cache=tmp_path / "cache",
    )
    draws = [[trainer.dataset[(i, epoch)]["spoken"] for i in range(6)] for epoch in range(6)]
    assert all(not row[0] and not row[3] for row in draws)  # "none": no spoken form
    assert draws != [draws[0]] * 6 and any(any(row) for row in draws)
    assert draws == [[trainer.dataset[(i, epoch)]["spoken"] for i in range(6)] for epoch in range(6)]


def test_two_processes_build_one_cache_between_them(tmp_path):
    path = write_records(tmp_path / "data", count=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29571",
            "-m",
            "omnifast.cli",
            "cache",
            "--stage",
            "emotion-dpo",
            "--data",
            str(path),
            "--out",
            str(tmp_path / "two"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        cli.main(
            ["cache", "--stage", "emotion-dpo", "--data", str(path), "--out", str(tmp_path / "one"), "--no-progress"]
        )
        == 0
    )
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert {name.split("-")[1] for name in index["shards"]} == {"r0", "r1"}
    records = load_records(path, get_stage("emotion-dpo"), UNITS)
    one, two = StateCache.open(tmp_path / "one", records=records), StateCache.open(tmp_path / "two", records=records)
    for position in range(7):  # other batches, other rounding: within float32 error of the states
        for a, b in zip(one.lookup(position, False), two.lookup(position, False)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, (chosen, rejected) in one.references.values.items():
        assert two.references.values[key] == pytest.approx((chosen, rejected), rel=1e-5)
