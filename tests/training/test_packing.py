"""Packing, token budgets and per-block options: a packed micro-batch gives the loss and gradients
of the padded batch of the same records for every stage's loss (text, CTC, CTC-DPO, AR); token
budgets bucket records by length, depend on (seed, epoch, step) alone and deal equal work to the
ranks; checkpointing changes no number and compilation matches eager."""

import copy
import json

import numpy as np
import pytest
import torch

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.training import TrainConfig, Trainer, get_stage, load_records
from omnifast.training.loader import TokenBudgetBatches, collate_batch, collate_packed

from .test_training import write_data

UNITS = 20


def varied_records(root, stage):
    """The shared data with answers of different lengths, so that a batch has padding."""
    data = write_data(root)
    path = data / f"{stage}.json"
    rows = json.loads(path.read_text())
    for i, row in enumerate(rows):
        row["conversations"][-1]["value"] += " and more" * (2 * i)
    path.write_text(json.dumps(rows))
    return path


def tiny(mode="nar"):
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    config.speech_decoder_mode = mode
    return OmniModel(config).double(), OmniProcessor(build_tiny_tokenizer(), config)


def loss_and_grads(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss(batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "stage_name, mode",
    [("s2t", "nar"), ("i2t-sft", "nar"), ("speech-gen", "nar"), ("emotion-dpo", "nar"), ("speech-gen", "ar")],
)
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(tmp_path, stage_name, mode):
    """float64 model; the router's softmax and the fused losses accumulate in float32 by
    contract, so agreement is to float32's precision (1e-6 relative), not to float64's."""
    stage = get_stage(stage_name)
    model, processor = tiny(mode)
    records = load_records(varied_records(tmp_path / "data", stage_name), stage, UNITS)
    trainers = {}
    for packing in (False, True):
        config = TrainConfig(stage=stage_name, batch_size=4, packing=packing, progress=False)
        trainers[packing] = Trainer(copy.deepcopy(model), processor, records, config, tmp_path / str(packing))
    items = [trainers[False].dataset[(i, 0)] for i in range(4)]
    pad = processor.tokenizer.pad_token_id
    padded = loss_and_grads(trainers[False], collate_batch(items, pad))
    packed_batch = collate_packed(items, pad)
    assert (
        packed_batch["input_ids"].shape[0] == 1
        and int(packed_batch["lengths"].sum())
        == packed_batch["input_ids"].shape[1]
        < collate_batch(items, pad)["input_ids"].numel()
    )
    packed = loss_and_grads(trainers[True], packed_batch)
    assert packed[0] == pytest.approx(padded[0], rel=1e-6)
    assert padded[1].keys() == packed[1].keys() and padded[1]
    for name, grad in padded[1].items():
        scale = grad.abs().max().clamp(min=1e-30)
        assert float((packed[1][name] - grad).abs().max() / scale) <= 1e-6, name


def test_token_budgets_bucket_by_length_and_deal_equal_work():
    costs = np.random.default_rng(0).lognormal(np.log(60), 0.7, 500).astype(int) + 1
    one = TokenBudgetBatches(costs, 1000, seed=1, window=200)
    two = [TokenBudgetBatches(costs, 1000, seed=1, rank=r, world=2, window=200) for r in range(2)]
    assert one.total(3) == sum(one.count(e) for e in range(3)) and two[0].count(0) == two[1].count(0)
    for sampler, _world in ((one, 1), (two, 2)):
        ranks = sampler if isinstance(sampler, list) else [sampler]
        seen = []
        for micro in range(ranks[0].count(0)):
            shares = [r.indices(micro) for r in ranks]
            loads = [int(costs[share].sum()) for share in shares]
            assert max(loads) <= 1000 and max(loads) - min(loads) <= costs[sum(shares, [])].max()
            seen += sum(shares, [])
        assert sorted(seen) == list(range(500))  # each record once an epoch

    def padding(batches):
        return 1 - sum(costs[b].sum() for b in batches) / sum(costs[b].max() * len(b) for b in batches)

    bucketed = [one.indices(m) for m in range(one.count(0))]
    shuffled = np.random.default_rng(1).permutation(500)
    sizes = np.cumsum([len(b) for b in bucketed])[:-1]
    assert padding(bucketed) < 0.5 * padding(np.split(shuffled, sizes))  # length-bucketed
    resumed = TokenBudgetBatches(costs, 1000, seed=1, window=200, start=7, stop=one.count(0) + 5)
    assert [[i for i, _ in b] for b in resumed] == [one.indices(m) for m in range(7, one.count(0) + 5)]
    assert one.indices(one.count(0)) != one.indices(0)  # another epoch, another order
    assert [one.indices(m) for m in range(5)] == [
        TokenBudgetBatches(costs, 1000, seed=1, window=200).indices(m) for m in range(5)
    ]
    with pytest.raises(ValueError, match="max_tokens=50 is smaller than record"):
        TokenBudgetBatches(costs, 50, seed=1)


def test_max_tokens_trains_and_resumes(tmp_path):
    from omnifast import cli

    data = varied_records(tmp_path / "data", "speech-gen")
    args = [
        "train",
        "--stage",
        "speech-gen",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--max-tokens",
        "200",
        "--packing",
        "--epochs",
        "3",
        "--save-every",
        "2",
        "--no-progress",
    ]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_changes_no_number(tmp_path, mode):
    stage = get_stage("speech-gen")
    model, processor = tiny()
    records = load_records(varied_records(tmp_path / "data", "speech-gen"), stage, UNITS)
    results = []
    for option in ("off", mode):
        config = TrainConfig(stage="speech-gen", batch_size=4, activation_checkpointing=option, progress=False)
        trainer = Trainer(copy.deepcopy(model), processor, records, config, tmp_path / option)
        batch = collate_batch([trainer.dataset[(i, 0)] for i in range(4)], processor.tokenizer.pad_token_id)
        results.append(loss_and_grads(trainer, batch))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_compiled_blocks_match_eager(tmp_path):
    """torch.compile of each decoder block (dynamic shapes): the same loss and gradients as eager
    within float32 rounding, for two batch shapes."""
    stage = get_stage("speech-gen")
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    model, processor = OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)
    records = load_records(varied_records(tmp_path / "data", "speech-gen"), stage, UNITS)
    trainers = [
        Trainer(
            copy.deepcopy(model),
            processor,
            records,
            TrainConfig(stage="speech-gen", batch_size=4, compile=compiled, progress=False),
            tmp_path / str(compiled),
        )
        for compiled in (False, True)
    ]
    for keys in ([(0, 0), (1, 0)], [(1, 0), (2, 0), (3, 0)]):
        batch = collate_batch([trainers[0].dataset[k] for k in keys], processor.tokenizer.pad_token_id)
        (eager_loss, eager), (compiled_loss, compiled) = (loss_and_grads(t, batch) for t in trainers)
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        for name, grad in eager.items():
            scale = grad.abs().max().clamp(min=1e-12)
            assert float((compiled[name] - grad).abs().max() / scale) < 1e-4, name
