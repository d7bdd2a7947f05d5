"""The one learning-rate schedule: a linear warmup and a cosine decay to 0."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omnifast.schedule import warmup_cosine


@given(total=st.integers(0, 400), ratio=st.floats(0, 1))
def test_warmup_then_cosine_over_the_rest(total, ratio):
    warmup = math.ceil(total * ratio)
    factor = warmup_cosine(total, warmup)
    for step in range(total + 1):
        expected = (
            (step + 1) / (warmup + 1)
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        )
        assert factor(step) == expected, (step, factor(step), expected)
    if total > warmup:  # the decay ends at 0 on step total
        assert factor(total) == pytest.approx(0.0, abs=1e-12)


@given(total=st.integers(1, 400), warmup=st.integers(0, 50))
def test_cosine_over_every_step_scaled_by_the_warmup_ramp(total, warmup):
    factor = warmup_cosine(total, warmup, decay_from_start=True)
    for step in range(total + 1):
        expected = min(1.0, (step + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * step / total))
        assert factor(step) == expected, (step, factor(step), expected)


@pytest.mark.parametrize(
    "args,error,name",
    [
        ((-1, 0), ValueError, "total"),
        ((10, -2), ValueError, "warmup"),
        ((10.0, 1), TypeError, "total"),
        ((10, True), TypeError, "warmup"),
    ],
)
def test_bad_arguments_are_named(args, error, name):
    with pytest.raises(error, match=name):
        warmup_cosine(*args)
