"""The CTC-posterior speech projector (``speech_projector="ctc_posterior"``): speech enters the LLM
as soft text, the speech CTC head's posteriors over the LLM's tokens weighing the LLM's own token
embeddings (the blank a learned embedding), averaged over ``speech_stack`` frames, or, compressed
(``"ctc_compress"``), merged by the head's greedy reading into one position per read token; in
float64 against a direct sum, for certain and uncertain posteriors, forward and gradients."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.models.omni import CTCPosteriorProjector


def ctc_config(**changes) -> OmniConfig:
    return dataclasses.replace(
        OmniConfig.tiny(), **{"speech_ctc": True, "speech_projector": "ctc_posterior", **changes}
    )


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
    assert_matches_on_random_logits(
        reference, False, n, positions * stack + tail, stack, vocab, hidden, sharpness, seed
    )


def assert_matches_on_random_logits(
    reference, compress, n, frames, stack, vocab, hidden, sharpness, seed, blank_bias=0.0
):
    """A projector on random (n, frames, vocab + 1) logits (the blank's raised by ``blank_bias``)
    against ``reference(logits, embeddings, blank, stack)`` in float64, forward and the gradients
    of logits, embeddings and blank (zero where an input does not reach the output)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, frames, vocab + 1, generator=g) * sharpness).double()
    logits[..., -1] += blank_bias
    embeddings = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    projector = CTCPosteriorProjector(stack, hidden, compress=compress).double()
    with torch.no_grad():
        projector.blank.copy_(torch.randn(hidden, generator=g))
    logits.requires_grad_(True)
    out = projector(logits, embeddings)
    expected = reference(logits, embeddings, projector.blank, projector.stack)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = (logits, embeddings, projector.blank)
    got = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def compressed_reference(logits, embeddings, blank, stack):
    """Each clip: its greedy CTC reading's runs of one token, blank runs dropped; a run enters as
    the mean over its frames of the posteriors over the tokens alone (blank renormalised away)
    weighing the embeddings; the last T // stack runs fill the last positions, the blank the rest."""
    n, T, classes = logits.shape
    slots = T // stack
    rows = []
    for b in range(n):
        runs, previous = [], None
        for frame in range(slots * stack):
            token = int(logits[b, frame].argmax())
            if token != classes - 1:
                if token == previous:
                    runs[-1].append(frame)
                else:
                    runs.append([frame])
            previous = token
        read = [
            (sum(logits[b, f, :-1].softmax(-1) for f in frames) / len(frames)) @ embeddings
            for frames in runs[max(0, len(runs) - slots) :]
        ]
        rows.append(torch.stack([blank] * (slots - len(read)) + read))
    return torch.stack(rows)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    positions=st.integers(1, 4),
    stack=st.integers(1, 3),
    tail=st.integers(0, 2),
    vocab=st.integers(1, 4),
    hidden=st.integers(1, 4),
    blank_bias=st.sampled_from([-2.0, 0.0, 2.0]),
    sharpness=st.sampled_from([0.3, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_compression_merges_the_frames_by_their_greedy_reading(
    n, positions, stack, tail, vocab, hidden, blank_bias, sharpness, seed
):
    tail = tail % stack
    # blank_bias: from mostly-blank readings to readings with more runs than positions
    assert_matches_on_random_logits(
        compressed_reference, True, n, positions * stack + tail, stack, vocab, hidden, sharpness, seed, blank_bias
    )


def test_a_compressed_certain_reading_is_the_transcripts_embeddings_after_the_blanks():
    embeddings = torch.randn(5, 3, dtype=torch.float64)
    logits = torch.full((1, 9, 6), -1e4, dtype=torch.float64)
    for frame, token in enumerate((5, 2, 2, 5, 5, 2, 4, 4, 5)):  # 5: the blank; reads 2 2 4
        logits[0, frame, token] = 0.0
    projector = CTCPosteriorProjector(2, 3, compress=True).double()  # 4 positions
    with torch.no_grad():
        projector.blank.fill_(7.0)
    out = projector(logits, embeddings)[0]
    torch.testing.assert_close(
        out, torch.stack([projector.blank.detach(), embeddings[2], embeddings[2], embeddings[4]])
    )
    six_frames = projector(logits[:, :6], embeddings)[0]  # reads 2 2 into 3 positions
    torch.testing.assert_close(six_frames[1:], embeddings[[2, 2]])
    torch.testing.assert_close(six_frames[0], projector.blank.detach())
    projector.stack = 3  # 9 frames, 3 positions: reads 2 2 4
    torch.testing.assert_close(projector(logits, embeddings)[0], embeddings[[2, 2, 4]])
    projector.stack = 4  # 8 frames, 2 positions: reads 2 2 4, the earliest dropped
    torch.testing.assert_close(projector(logits, embeddings)[0], embeddings[[2, 4]])


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


@pytest.mark.parametrize("projector", ["ctc_posterior", "ctc_compress"])
def test_the_model_reads_speech_through_its_ctc_head(tmp_path, projector):
    torch.manual_seed(0)
    config = ctc_config(speech_projector=projector)
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
    batch["speech_features"] = features
    if projector == "ctc_posterior":  # the compressed blank is never seen: its positions are masked
        model.freeze(except_=("speech_projector",))
        model(**batch).loss.backward()
        assert model.speech_projector.blank.grad is not None and model.speech_projector.blank.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    again = OmniModel.from_pretrained(tmp_path).double()
    assert again.config.speech_projector == projector
    torch.testing.assert_close(again.eval().encode_speech(features), model.eval().encode_speech(features))


def half_blank_compressing_model() -> OmniModel:
    """A tiny ``ctc_compress`` model whose untrained head reads about half the frames as blank."""
    torch.manual_seed(0)
    model = OmniModel(ctc_config(speech_projector="ctc_compress")).double().eval()
    with torch.no_grad():
        model.speech_ctc_head.weight.mul_(50.0)
    return model


def speech_batch(model, processor, seconds):
    rng = np.random.default_rng(1)
    conversations = [
        [{"from": "human", "value": f"say <speech> {i}"}, {"from": "gpt", "value": "a red circle" * (i + 1)}]
        for i in range(len(seconds))
    ]
    waves = [[(rng.standard_normal(int(16000 * t)) * 0.1).astype(np.float32)] for t in seconds]
    batch = processor(conversations, audios=waves)
    batch["speech_features"] = batch["speech_features"].double()
    with torch.no_grad():  # the blank's logit at the median margin: about half the frames read blank
        logits = model.speech_ctc_head(model.speech_frames(batch["speech_features"]))
        margin = logits[..., :-1].max(-1).values - logits[..., -1]
        model.speech_ctc_head.bias[-1] += margin.median()
    return batch


def test_compressed_blank_positions_are_unseen_padded_packed_and_in_generation(monkeypatch):
    """The LLM's states with a compressing projector equal those of each record with its blank
    positions removed: padded (masked, positions renumbered), packed (dropped), and generating."""
    model = half_blank_compressing_model()
    processor = OmniProcessor(build_tiny_tokenizer(), model.config)
    batch = speech_batch(model, processor, (1.0, 0.4))
    with torch.no_grad():
        embeds, visible = model.embed_visible(batch["input_ids"], None, batch["speech_features"])
        speech = batch["input_ids"] == model.config.speech_token_id
        assert visible is not None and (~visible[speech]).any() and visible[speech].any() and visible[~speech].all()
        padded = model(**batch)
        for row in range(2):
            seen = visible[row] & batch["attention_mask"][row].bool()
            alone = model.llm.model(inputs_embeds=embeds[row, seen][None]).last_hidden_state[0]
            torch.testing.assert_close(padded.hidden_states[row, seen], alone, rtol=1e-10, atol=1e-10)
        real = batch["attention_mask"].bool()
        packed = model(
            input_ids=batch["input_ids"][real][None],
            labels=batch["labels"][real][None],
            speech_features=batch["speech_features"],
            lengths=real.sum(1),
        )
        torch.testing.assert_close(packed.text_loss, padded.text_loss, rtol=1e-10, atol=1e-12)
        seen = visible & real
        torch.testing.assert_close(packed.hidden_states[seen], padded.hidden_states[seen], rtol=1e-10, atol=1e-10)

        ids = batch["input_ids"][0, : int(real[0].sum())][None]
        features = batch["speech_features"][:1]
        from omnifast.models import generation

        prompts, original = [], generation.forward_with_cache

        def recording(module, cache, **inputs):
            prompts.append(inputs.get("inputs_embeds"))
            return original(module, cache, **inputs)

        monkeypatch.setattr(generation, "forward_with_cache", recording)
        answer = model.generate(ids, speech_features=features, max_new_tokens=3)
        row_embeds, row_visible = model.embed_visible(ids, None, features)
        context = row_embeds[:, row_visible[0]]
        expected = []
        for _ in range(3):
            token = int(model.llm(inputs_embeds=context).logits[0, -1].argmax())
            expected.append(token)
            context = torch.cat([context, model.llm.get_input_embeddings()(torch.tensor([[token]]))], 1)
    assert answer.token_ids == expected
    torch.testing.assert_close(prompts[0], row_embeds[:, row_visible[0]])


def test_bad_settings_are_refused_by_name():
    for projector in ("ctc_posterior", "ctc_compress"):
        with pytest.raises(ValueError, match="speech_ctc=True"):
            dataclasses.replace(OmniConfig.tiny(), speech_projector=projector).validate()
    with pytest.raises(ValueError, match="speech_projector must be one of"):
        dataclasses.replace(OmniConfig.tiny(), speech_projector="qformer").validate()
    with pytest.raises(ValueError, match="classes"):
        CTCPosteriorProjector(1, 3)(torch.zeros(1, 2, 4), torch.zeros(5, 3))
