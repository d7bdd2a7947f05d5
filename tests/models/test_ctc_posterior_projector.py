"""The CTC-posterior speech projector (``speech_projector="ctc_posterior"``): speech enters the LLM
as soft text, the speech CTC head's posteriors over the LLM's tokens weighing the LLM's own token
embeddings (the blank a learned embedding), averaged over ``speech_stack`` frames; in float64
against a direct sum, for certain and uncertain posteriors, forward and gradients."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.models.omni import CTCPosteriorProjector


def ctc_config(**changes) -> OmniConfig:
    return dataclasses.replace(OmniConfig.tiny(), speech_ctc=True, speech_projector="ctc_posterior", **changes)


def reference(logits, embeddings, blank, stack):
    """Each LLM position: the mean over its frames of sum_t p(t) * e_t (e_blank for the blank)."""
    n, T, _ = logits.shape
    table = torch.cat([embeddings, blank[None]])
    out = torch.zeros(n, T // stack, embeddings.shape[1], dtype=logits.dtype)
    probs = logits.softmax(-1)
    for b in range(n):
        for position in range(T // stack):
            for frame in range(position * stack, (position + 1) * stack):
                out[b, position] += (probs[b, frame, :, None] * table).sum(0) / stack
    return out


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 2),
    positions=st.integers(1, 4),
    stack=st.integers(1, 3),
    tail=st.integers(0, 2),
    vocab=st.integers(1, 6),
    hidden=st.integers(1, 5),
    sharpness=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_the_projection_is_the_posterior_weighted_embeddings_averaged_over_the_stack(
    n, positions, stack, tail, vocab, hidden, sharpness, seed
):
    tail = tail % stack  # frames past the last full stack are dropped, as the concat projector does
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, positions * stack + tail, vocab + 1, generator=g) * sharpness).double()
    embeddings = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    projector = CTCPosteriorProjector(stack, hidden).double()
    with torch.no_grad():
        projector.blank.copy_(torch.randn(hidden, generator=g))
    logits.requires_grad_(True)
    out = projector(logits, embeddings)
    expected = reference(logits, embeddings, projector.blank, stack)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (logits, embeddings, projector.blank))
    want = torch.autograd.grad((expected * weights).sum(), (logits, embeddings, projector.blank))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_certain_reading_enters_the_llm_as_the_tokens_own_embeddings():
    embeddings = torch.randn(5, 3, dtype=torch.float64)
    logits = torch.full((1, 4, 6), -1e4, dtype=torch.float64)
    for frame, token in enumerate((2, 5, 0, 5)):  # 5: the blank
        logits[0, frame, token] = 0.0
    projector = CTCPosteriorProjector(1, 3).double()
    out = projector(logits, embeddings)[0]
    torch.testing.assert_close(out[0], embeddings[2])
    torch.testing.assert_close(out[2], embeddings[0])
    torch.testing.assert_close(out[1], projector.blank.detach())


def test_the_model_reads_speech_through_its_ctc_head_and_trains_the_blank(tmp_path):
    torch.manual_seed(0)
    config = ctc_config()
    model = OmniModel(config).double()
    processor = OmniProcessor(build_tiny_tokenizer(), config)
    wave = (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32)
    batch = processor(
        [[{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "a red circle"}]], audios=[[wave]]
    )
    features = batch["speech_features"].double()
    direct = model.speech_projector(
        model.speech_ctc_head(model.speech_frames(features)), model.llm.get_input_embeddings().weight
    )
    torch.testing.assert_close(model.encode_speech(features), direct)
    model.freeze(except_=("speech_projector",))
    batch["speech_features"] = features
    model(**batch).loss.backward()
    assert model.speech_projector.blank.grad is not None and model.speech_projector.blank.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    again = OmniModel.from_pretrained(tmp_path).double()
    assert again.config.speech_projector == "ctc_posterior"
    torch.testing.assert_close(again.eval().encode_speech(features), model.eval().encode_speech(features))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="speech_ctc=True"):
        dataclasses.replace(OmniConfig.tiny(), speech_projector="ctc_posterior").validate()
    with pytest.raises(ValueError, match="speech_projector must be one of"):
        dataclasses.replace(OmniConfig.tiny(), speech_projector="qformer").validate()
    with pytest.raises(ValueError, match="classes"):
        CTCPosteriorProjector(1, 3)(torch.zeros(1, 2, 4), torch.zeros(5, 3))
