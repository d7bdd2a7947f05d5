"""Greedy CTC decoding against a per-frame Python loop, and top-k / top-p sampling."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnifast
from omnifast.ops.decode import sample_top_k_top_p


def collapse(best, length, blank):
    units, previous = [], None
    for unit in best[:length]:
        if unit != previous and unit != blank:
            units.append(unit)
        previous = unit
    return units


@given(
    batch=st.integers(1, 5),
    frames=st.integers(1, 30),
    classes=st.integers(1, 6),
    blank=st.integers(0, 5),
    time_major=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_a_frame_loop(batch, frames, classes, blank, time_major, seed):
    blank = blank % classes
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, classes, generator=gen)
    x = x.round()  # ties and repeats are common
    lengths = torch.randint(0, frames + 1, (batch,), generator=gen)
    best = x.argmax(-1).tolist()
    expected = [collapse(best[b], int(lengths[b]), blank) for b in range(batch)]
    given_x = x.transpose(0, 1) if time_major else x
    assert omnifast.ctc_greedy_decode(given_x, lengths, blank, time_major=time_major) == expected
    assert (
        omnifast.ctc_greedy_decode(torch.log_softmax(given_x, -1), lengths.tolist(), blank, time_major=time_major)
        == expected
    )


def test_one_sequence_and_full_lengths():
    x = torch.full((6, 3), -5.0)
    for t, c in enumerate([1, 1, 0, 1, 2, 2]):
        x[t, c] = 0.0
    assert omnifast.ctc_greedy_decode(x, blank=0) == [[1, 1, 2]]
    assert omnifast.ctc_greedy_decode(x, [3], blank=0) == [[1]]


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.zeros(2, 3, 4, dtype=torch.long),), TypeError, "log_probs_or_logits"),
        ((torch.zeros(2, 3, 4, 5),), ValueError, "log_probs_or_logits"),
        ((torch.zeros(2, 3, 4), None, 4), ValueError, "blank"),
        ((torch.zeros(2, 3, 4), [1, 2, 3]), ValueError, "lengths"),
        ((torch.zeros(2, 3, 4), [1, 4]), ValueError, "lengths"),
        ((torch.zeros(2, 3, 4), torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        omnifast.ctc_greedy_decode(*args)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([3.0, 2.9, 2.8, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample_top_k_top_p(logits, top_k=2, generator=gen) for _ in range(200)} == {0, 1}
    assert {sample_top_k_top_p(logits, top_k=1, generator=gen) for _ in range(20)} == {0}
    assert {sample_top_k_top_p(logits, top_p=1e-6, generator=gen) for _ in range(20)} == {0}
    # the first three hold ~99% of the mass: top_p=0.9 never reaches the tail
    assert {sample_top_k_top_p(logits, top_p=0.9, generator=gen) for _ in range(300)} == {0, 1, 2}
    assert len({sample_top_k_top_p(logits, temperature=100.0, generator=gen) for _ in range(300)}) == 5
    for kwargs, match in (
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=0.0), "temperature"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_top_k_top_p(logits, **kwargs)
