"""Bad input gets a TypeError/ValueError naming the argument, before any kernel runs."""

import pytest
import torch

import omnifast

from ..devices import device_for

T, B, C = 6, 2, 5


def good():
    return dict(
        log_probs=torch.randn(T, B, C).log_softmax(-1),
        targets=torch.tensor([[1, 2], [3, 3]]),
        input_lengths=torch.tensor([6, 5]),
        target_lengths=torch.tensor([2, 1]),
    )


def call(backend="cpu", **changes):
    """The op on the backend's test device: bad input on a GPU gets the same clear error."""
    kwargs = good()
    kwargs.update(changes)
    device = device_for(backend)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return omnifast.ctc_loss(**kwargs, backend=backend)


BAD = [
    (TypeError, "log_probs", dict(log_probs=[[0.0]])),
    (TypeError, "log_probs", dict(log_probs=torch.zeros(T, B, C, dtype=torch.long))),
    (ValueError, "log_probs", dict(log_probs=torch.zeros(T))),
    (ValueError, "log_probs", dict(log_probs=torch.zeros(0, B, C))),
    (TypeError, "targets", dict(targets=torch.tensor([[1.0, 2.0], [3.0, 3.0]]))),
    (ValueError, "targets", dict(targets=torch.tensor([[1, 2]]))),
    (ValueError, "targets", dict(targets=torch.zeros(2, 2, 2, dtype=torch.long))),
    (ValueError, "targets", dict(targets=torch.tensor([[1, 5], [3, 3]]))),
    (ValueError, "targets", dict(targets=torch.tensor([[1, -1], [3, 3]]))),
    (ValueError, "blank", dict(targets=torch.tensor([[1, 0], [3, 3]]))),
    (ValueError, "targets", dict(targets=torch.tensor([1, 2, 3, 4]))),
    (TypeError, "input_lengths", dict(input_lengths=torch.tensor([6.0, 5.0]))),
    (TypeError, "target_lengths", dict(target_lengths=[2.0, 1.0])),
    (ValueError, "input_lengths", dict(input_lengths=torch.tensor([6, -1]))),
    (ValueError, "target_lengths", dict(target_lengths=torch.tensor([-2, 1]))),
    (ValueError, "input_lengths", dict(input_lengths=torch.tensor([7, 5]))),
    (ValueError, "input_lengths", dict(input_lengths=torch.tensor([6, 5, 4]))),
    (ValueError, "target_lengths", dict(target_lengths=torch.tensor([3, 1]))),
    (ValueError, "target_lengths", dict(target_lengths=torch.tensor([2]))),
    (ValueError, "blank", dict(blank=5)),
    (ValueError, "blank", dict(blank=-1)),
    (TypeError, "blank", dict(blank=0.0)),
    (ValueError, "reduction", dict(reduction="average")),
    (TypeError, "zero_infinity", dict(zero_infinity="yes")),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("error,name,changes", BAD, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(error, name, changes, backend):
    with pytest.raises(error, match=name):
        call(backend, **changes)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("OMNIFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="OMNIFAST_BACKEND"):
        call(backend=None)


def test_logits_variant_names_logits():
    with pytest.raises(TypeError, match="logits"):
        omnifast.ctc_loss_with_logits(torch.zeros(T, B, C, dtype=torch.int32), good()["targets"], [6, 5], [2, 1])


def test_padding_beyond_target_lengths_is_ignored():
    """Values past each target length are padding: anything goes there."""
    kwargs = good()
    kwargs["targets"] = torch.tensor([[1, 2], [3, 99]])
    assert torch.isfinite(omnifast.ctc_loss(**kwargs))
