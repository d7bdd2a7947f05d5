"""Hostile and broken files at every loader: a shard outside its folder, NaN weights, a tensor of
another dtype or shape, a truncated file, a broken settings file, an empty index, the wrong
architecture in a component folder, a pickle as pytorch_model.bin, a component with a missing
weight. Each is refused (or, for a dtype, cast with a warning) naming the file and the key."""

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnifast.models import OmniConfig, OmniModel, save_speech_decoder
from omnifast.models.components import load_components, load_speech_decoder
from omnifast.models.safe_load import WeightsError
from omnifast.models.weights import INDEX_NAME
from omnifast.openomni import load_openomni

from .test_components import folders
from .test_from_openomni import openomni_checkpoint, small_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved")
    OmniModel(OmniConfig.tiny()).save_pretrained(folder)
    return folder


def edited(saved, tmp_path, edit):
    """A copy of the saved model with one tensor changed by ``edit(tensors)``."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"), {"format": "pt"})
    return copy


KEY = "llm.model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: t[KEY].fill_(math.nan), WeightsError, f"{KEY} holds NaN or infinite values"),
        (lambda t: t.update({KEY: t[KEY][:3]}), WeightsError, f"{KEY} has shape \\(3, 128\\), the model's is"),
        (lambda t: t.update({KEY: t[KEY].long()}), WeightsError, f"{KEY} holds torch.int64 values"),
    ],
)
def test_from_pretrained_refuses_bad_tensors_by_file_and_key(saved, tmp_path, change, error, match):
    folder = edited(saved, tmp_path, change)
    with pytest.raises(error, match=match) as found:
        OmniModel.from_pretrained(folder)
    assert "model.safetensors" in str(found.value)


def test_nan_weights_load_for_inspection_and_another_dtype_is_cast_by_name(saved, tmp_path):
    folder = edited(saved, tmp_path, lambda t: t[KEY].fill_(math.nan))
    assert torch.isnan(OmniModel.from_pretrained(folder, allow_nonfinite=True).state_dict()[KEY]).all()
    folder = edited(saved, tmp_path / "x", lambda t: t.update({KEY: t[KEY].double()}))
    with pytest.warns(UserWarning, match=f"cast to torch.float32: {KEY} \\(torch.float64\\)"):
        model = OmniModel.from_pretrained(folder)
    assert model.state_dict()[KEY].dtype == torch.float32


def test_broken_files_are_named(saved, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f"{weights}: not a readable safetensors file"):
        OmniModel.from_pretrained(folder)
    (folder / "omnifast_config.json").write_text("{broken")
    with pytest.raises(WeightsError, match="omnifast_config.json: not valid JSON"):
        OmniModel.from_pretrained(folder)
    (folder / "omnifast_config.json").write_text(json.dumps({"llm": {}}))
    with pytest.raises(WeightsError, match="omnifast_config.json: "):
        OmniModel.from_pretrained(folder)
    shutil.copy(saved / "omnifast_config.json", folder / "omnifast_config.json")
    weights.unlink()
    (folder / INDEX_NAME).write_text("{}")
    with pytest.raises(WeightsError, match="has no 'weight_map'"):
        OmniModel.from_pretrained(folder)


def test_from_openomni_keeps_to_its_folder_refuses_pickles_and_nan(tmp_path):
    config = small_config()
    folder = tmp_path / "ckpt"
    openomni_checkpoint(folder, config)
    index = json.loads((folder / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((folder / index["weight_map"][name]).read_bytes())
    original = index["weight_map"][name]
    index["weight_map"][name] = "../outside.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="the files it names must lie in"):
        load_openomni(folder, config)
    index["weight_map"][name] = original
    (folder / INDEX_NAME).write_text(json.dumps(index))
    shard = folder / original
    tensors = load_file(str(shard))
    nan_key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[nan_key] = tensors[nan_key].clone().fill_(math.inf)
    save_file(tensors, str(shard))
    with pytest.raises(WeightsError, match="holds NaN or infinite values"):
        load_openomni(folder, config)
    assert load_openomni(folder, config, allow_nonfinite=True) is not None
    pickled = tmp_path / "pickled"
    pickled.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(WeightsError, match="omnifast never unpickles objects or code"):
        load_openomni(pickled, config)


def test_components_refuse_the_wrong_architecture_and_missing_weights(components, tmp_path):
    root, parts, _ = components
    wrong = {**folders(root), "speech": root / "vision"}
    with pytest.raises(WeightsError, match="speech=.* holds a 'clip_vision_model' model .*speech takes whisper"):
        load_components(**wrong)
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(root / "llm", llm)
    tensors = load_file(str(llm / "model.safetensors"))
    dropped = "model.layers.0.mlp.up_proj.weight"
    del tensors[dropped]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(llm / "model.safetensors"), {"format": "pt"})
    with pytest.raises(WeightsError, match=f"llm=.*missing keys: {dropped}.*unexpected keys: model.extra.weight"):
        load_components(**{**folders(root), "llm": llm})
    model, _ = load_components(**{**folders(root), "llm": llm}, strict=False)
    assert model.llm is not None


def test_a_saved_speech_decoder_is_checked(tmp_path):
    from omnifast.nn import SpeechDecoderConfig, build_speech_decoder

    decoder = build_speech_decoder(SpeechDecoderConfig.tiny(), "nar")
    save_speech_decoder(decoder, tmp_path)
    tensors = load_file(str(tmp_path / "speech_decoder.safetensors"))
    key = "head.weight"
    tensors[key] = tensors[key].clone().fill_(math.nan)
    save_file(tensors, str(tmp_path / "speech_decoder.safetensors"))
    with pytest.raises(WeightsError, match=f"speech_decoder.safetensors: {key} holds NaN"):
        load_speech_decoder(tmp_path)
    (tmp_path / "speech_decoder.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="speech_decoder.json: a speech decoder settings file holds a JSON object"):
        load_speech_decoder(tmp_path)
