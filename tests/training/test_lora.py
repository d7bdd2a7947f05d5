"""LoRA for the LLM stages: the merged model computes what the adapted one does, a step's
gradients are those of the same low-rank update written by hand, only the adapters train and are
checkpointed, a resumed run equals an uninterrupted one bit for bit, and the saved model is merged
(or the adapters are saved beside an untouched LLM)."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from omnifast import cli
from omnifast.models import OmniConfig, OmniModel
from omnifast.training import latest_checkpoint
from omnifast.training.config import TrainConfig
from omnifast.training.lora import add_adapters, merge_adapters

from .test_training import assert_same_weights_bit_for_bit


def adapted(rank=4, alpha=8.0):
    torch.manual_seed(0)
    llm = OmniModel(OmniConfig.tiny()).llm.double()
    add_adapters(llm, TrainConfig(stage="i2t-sft", lora_r=rank, lora_alpha=alpha).validate())
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return llm.double()


def test_the_merged_model_computes_what_the_adapted_one_does():
    llm = adapted()
    ids = torch.randint(0, 300, (2, 9))
    before = llm(ids).logits
    merged = merge_adapters(copy.deepcopy(llm))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, before, rtol=1e-10, atol=1e-10)


class HandLoRA(torch.nn.Module):
    """W x + (alpha / r) B A x, written out."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = (
            base,
            torch.nn.Parameter(a.clone()),
            torch.nn.Parameter(b.clone()),
            scale,
        )

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def test_a_lora_steps_gradients_are_those_of_the_low_rank_update_by_hand():
    from peft.tuners.lora import LoraLayer

    llm = adapted(rank=4, alpha=8.0)
    hand = copy.deepcopy(llm)
    pairs = []
    for name, layer in list(hand.named_modules()):
        if isinstance(layer, LoraLayer):
            parent = hand.get_submodule(name.rsplit(".", 1)[0])
            replacement = HandLoRA(
                layer.get_base_layer(),
                layer.lora_A["default"].weight.detach(),
                layer.lora_B["default"].weight.detach(),
                8.0 / 4,
            )
            setattr(parent, name.rsplit(".", 1)[-1], replacement)
            pairs.append((name, replacement))
    ids = torch.randint(0, 300, (2, 9))
    for model in (llm, hand):
        model(ids, labels=ids).loss.backward()
    assert len(pairs) == 2 * 7  # every projection of both layers
    for name, module in pairs:
        ours = llm.get_submodule(name)
        torch.testing.assert_close(ours.lora_A["default"].weight.grad, module.a.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.lora_B["default"].weight.grad, module.b.grad, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for n, p in llm.named_parameters() if "lora_" not in n)  # the LLM's own weights frozen


def train(data_dir, out, *extra):
    return cli.main(
        [
            "train",
            "--stage",
            "i2t-sft",
            "--model",
            "tiny",
            "--data",
            str(data_dir / "i2t-sft.json"),
            "--out",
            str(out),
            "--no-progress",
            "--epochs",
            "8",
            "--lora-r",
            "4",
            *map(str, extra),
        ]
    )


def test_only_the_adapters_train_a_resume_is_bit_for_bit_and_the_model_is_merged(data, tmp_path):
    assert train(data, tmp_path / "straight", "--max-steps", 4, "--save-every", 2) == 0
    weights = load_file(str(latest_checkpoint(tmp_path / "straight") / "trainable.safetensors"))
    llm = [k for k in weights if k.startswith("llm.")]
    assert llm and all("lora_" in k for k in llm)
    assert any(k.startswith(("vision.", "image_projector.")) for k in weights)  # what the stage trains besides
    saved = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    start = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert train(data, tmp_path / "run", "--max-steps", 4, "--save-every", 2) == 0
    shutil.rmtree(tmp_path / "run" / "model")
    shutil.rmtree(latest_checkpoint(tmp_path / "run"))
    assert train(data, tmp_path / "run", "--max-steps", 4, "--save-every", 2, "--resume") == 0
    assert_same_weights_bit_for_bit(tmp_path / "straight", tmp_path / "run")
    assert start.keys() == saved.keys()


def test_adapters_can_be_saved_beside_an_untouched_llm_and_lora_needs_a_stage_that_trains_it(data, tmp_path):
    torch.manual_seed(0)
    fresh = OmniModel(OmniConfig.tiny()).llm.state_dict()
    assert train(data, tmp_path / "run", "--max-steps", 2, "--lora-save", "adapters") == 0
    folder = tmp_path / "run" / "model" / "adapters"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and "q_proj" in config["target_modules"]
    assert all("lora_" in k for k in load_file(str(folder / "adapter_model.safetensors")))
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(saved[f"llm.{k}"], v) for k, v in fresh.items())
    with pytest.raises(ValueError, match="LoRA adapts the LLM, which stage 'speech-gen' does not train"):
        cli.main(
            [
                "train",
                "--stage",
                "speech-gen",
                "--model",
                "tiny",
                "--data",
                str(data / "speech-gen.json"),
                "--out",
                str(tmp_path / "x"),
                "--lora-r",
                "4",
            ]
        )
    with pytest.raises(ValueError, match=r"lora_targets: the LLM has no modules named \['wq'\]"):
        train(data, tmp_path / "y", "--lora-targets", "wq")
