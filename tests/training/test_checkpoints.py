"""Checkpoints run no code and survive a crash: only safetensors and JSON on disk, a malicious
pickle is never executed, a tampered or truncated file is named in a clear error, and a failure
at any step of writing a checkpoint leaves the previous one for --resume, which then finishes the
run with the weights of an uninterrupted one, bit for bit."""

import builtins
import pickle

import pytest
import torch
from safetensors.torch import load_file

from omnifast import cli
from omnifast.training import CheckpointError, latest_checkpoint
from omnifast.training import checkpoint as checkpoints
from omnifast.training.checkpoint import join_tensors, split_tensors

ARGS = [
    "--stage",
    "speech-gen",
    "--model",
    "tiny",
    "--max-steps",
    "6",
    "--epochs",
    "6",
    "--save-every",
    "2",
    "--keep",
    "3",
    "--no-progress",
]


def train(data_dir, out, *extra) -> int:
    return cli.main(["train", *ARGS, "--data", str(data_dir / "speech-gen.json"), "--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert train(data, out) == 0
    return out


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def test_a_checkpoint_is_safetensors_and_json_only(straight):
    for step in latest_checkpoint(straight).parent.glob("step-*"):
        assert sorted(p.name for p in step.iterdir()) == [
            "optimizer.safetensors",
            "rng.safetensors",
            "state.json",
            "trainable.safetensors",
        ]


class Payload:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.safetensors", "state.json", "rng.safetensors"])
def test_a_malicious_pickle_in_a_checkpoint_is_never_executed(data, tmp_path, victim):
    assert train(data, tmp_path / "run", "--max-steps", 2) == 0
    found = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "executed"
    (found / victim).write_bytes(pickle.dumps(Payload(marker)))
    (found / "state.pt").write_bytes(pickle.dumps(Payload(marker)))  # the old format's name: never read
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        train(data, tmp_path / "run", "--max-steps", 4, "--resume")
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.safetensors", "state.json", "rng.safetensors"])
def test_a_truncated_or_missing_file_is_named(data, tmp_path, victim):
    assert train(data, tmp_path / "run", "--max-steps", 2) == 0
    path = latest_checkpoint(tmp_path / "run") / victim
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        train(data, tmp_path / "run", "--max-steps", 4, "--resume")
    path.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.replace('.', '[.]')}: missing"):
        train(data, tmp_path / "run", "--max-steps", 4, "--resume")


STEPS = [
    "write trainable.safetensors",
    "write optimizer.safetensors",
    "write rng.safetensors",
    "write state.json",
    "fsync directory",
    "rename",
    "fsync parent",
]


@pytest.mark.parametrize("failing", STEPS)
def test_a_failure_at_any_write_step_leaves_the_last_complete_checkpoint(
    data, tmp_path, straight, monkeypatch, failing
):
    """The second checkpoint (step 4) fails at ``failing``: --resume finds step 2 (or step 4 when
    the failure came after the rename) and finishes with the uninterrupted run's weights."""
    calls = []

    def hook(step):
        calls.append(step)
        if step == failing and calls.count(failing) == 2:
            raise OSError(f"injected failure at {step}")

    monkeypatch.setattr(checkpoints, "STEP_HOOK", hook)
    with pytest.raises(OSError, match="injected"):
        train(data, tmp_path)
    monkeypatch.setattr(checkpoints, "STEP_HOOK", None)
    renamed = STEPS.index(failing) > STEPS.index("rename")
    assert latest_checkpoint(tmp_path).name == ("step-00000004" if renamed else "step-00000002")
    assert train(data, tmp_path, "--resume") == 0
    for key, value in weights(straight).items():
        assert torch.equal(value, weights(tmp_path)[key]), key


def test_nested_state_round_trips_through_json_and_tensors(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.99),
                "params": [0],
                "name": "speech_decoder",
                "amsgrad": False,
                "foreach": None,
            }
        ],
        "inf": float("inf"),
    }
    tensors = {}
    stored = split_tensors(state, "optimizer", tensors)
    back = join_tensors(__import__("json").loads(__import__("json").dumps(stored)), tensors, tmp_path)
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and 0 in back["state"]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store a object"):
        split_tensors({"x": object()}, "p", {})


def test_what_a_killed_write_or_removal_left_is_swept_by_the_next_save(data, tmp_path):
    assert train(data, tmp_path, "--max-steps", 2) == 0
    root = tmp_path / "checkpoints"
    (root / "step-00000001.deleting").mkdir()  # killed inside retire(), after its rename
    (root / "step-00000003.tmp").mkdir()  # killed inside a write
    assert train(data, tmp_path, "--max-steps", 4, "--resume", "--allow-changed-run") == 0
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("option, value", [("--keep", 0), ("--save-every", 0), ("--batch-size", -1)])
def test_counts_below_one_are_refused(data, tmp_path, option, value):
    with pytest.raises(ValueError, match=f"{option[2:].replace('-', '_')} must be an integer >= 1"):
        train(data, tmp_path, option, value)


def test_resuming_a_finished_run_sweeps_what_its_last_save_left(data, tmp_path):
    assert train(data, tmp_path, "--max-steps", 4) == 0
    root = tmp_path / "checkpoints"
    (root / "step-00000002.deleting").mkdir()  # killed inside the final save's retire()
    assert train(data, tmp_path, "--max-steps", 4, "--resume") == 0
    assert not list(root.glob("*.deleting"))
