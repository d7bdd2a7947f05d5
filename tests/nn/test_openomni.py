"""Exactly OpenOmni when asked: with ``SpeechDecoderConfig.openomni()`` the speech decoder loaded
from OpenOmni's keys reproduces OpenOmni's stage-4 CTC loss and its stage-5 DPO loss, and every
gradient, in float64 (``omnifast/openomni/reference.py`` rebuilds OpenOmni's modules
from its code); omnifast's own defaults differ from it where the README says they do."""

import pytest
import torch

from omnifast.models import response_states
from omnifast.nn import SpeechDecoderConfig
from omnifast.nn.speech_decoder import uniform_upsample
from omnifast.openomni import reference as openomni
from omnifast.openomni import speech_decoder_from_state_dict
from omnifast.openomni.keys import speech_generator_state_dict

FACTOR = 3


def rounding_boundary():
    """An (n, frames) pair where OpenOmni's float assignment and the exact one part."""
    for n in range(1, 30):
        for frames in range(FACTOR * n + 1, FACTOR * n + 80):
            t = torch.arange(frames)
            exact = t * n // frames
            theirs = (t / (torch.tensor(frames) / n)).long()
            if not torch.equal(exact, theirs):
                return n, frames
    raise AssertionError("no boundary pair found")


def no_repeats(count, vocab):
    units = torch.randint(0, vocab, (count,)).tolist()
    for i in range(1, count):
        if units[i] == units[i - 1]:
            units[i] = (units[i] + 1) % vocab
    return torch.tensor(units)


def problem(seed=0):
    """Three records as OpenOmni batches them: LLM states of the whole turn (labels on its
    response), the response's text tokens (fewer than its labels), chosen and rejected units,
    one record with more units than factor x tokens, one at a rounding boundary."""
    torch.manual_seed(seed)
    config = SpeechDecoderConfig.openomni(
        **{
            k: v
            for k, v in SpeechDecoderConfig.tiny(upsample_factor=FACTOR).to_dict().items()
            if k not in ("fusion_causal", "upsample_rounding", "loss_normalization", "zero_infinity")
        }
    )
    n_boundary, frames_boundary = rounding_boundary()
    text_counts = [4, 2, n_boundary]
    unit_counts = [(9, 7), (FACTOR * 2 + 5, 3), (frames_boundary, frames_boundary - 1)]
    B, S = 3, 5 + max(text_counts) + 2
    text_reps = torch.randn(B, S, config.llm_hidden, dtype=torch.float64)
    labels = torch.full((B, S), -100)
    text_tokens = torch.full((B, max(text_counts)), -100)
    chosen = torch.full((B, max(u[0] for u in unit_counts)), -100)
    rejected = torch.full((B, max(u[1] for u in unit_counts)), -100)
    for b, (n, (uw, ul)) in enumerate(zip(text_counts, unit_counts)):
        labels[b, 3 : 3 + n + 2] = torch.randint(0, config.text_vocab, (n + 2,))  # header and tail labelled too
        text_tokens[b, :n] = torch.randint(0, config.text_vocab, (n,))
        chosen[b, :uw] = no_repeats(uw, config.units)  # feasible even where frames == units
        rejected[b, :ul] = no_repeats(ul, config.units)
    return config, text_reps, labels, text_tokens, chosen, rejected


def ours_inputs(text_reps, labels, text_tokens):
    states, _, hidden_mask = response_states(text_reps, labels)
    text_mask = text_tokens != -100
    return states, text_tokens.clamp(min=0), hidden_mask, text_mask


def assert_grads_equal(theirs, ours, config, text_reps_grads):
    grads = {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None}
    mapped = speech_generator_state_dict(grads, config)
    for name, p in ours.named_parameters():
        if name in mapped:
            torch.testing.assert_close(p.grad, mapped[name], rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(text_reps_grads[0], text_reps_grads[1], rtol=1e-9, atol=1e-11)


def test_the_openomni_preset_reproduces_openomnis_ctc_loss_and_gradients():
    config, text_reps, labels, text_tokens, chosen, _ = problem()
    theirs = openomni.SpeechGenerator(config).double()
    ours = speech_decoder_from_state_dict(theirs.state_dict(), config).double()
    reps_a = text_reps.clone().requires_grad_()
    loss_theirs = theirs(reps_a, labels, chosen, text_tokens)
    loss_theirs.backward()
    reps_b = text_reps.clone().requires_grad_()
    loss_ours = ours(*ours_inputs(reps_b, labels, text_tokens), units=chosen).loss
    loss_ours.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-12, atol=0)
    assert_grads_equal(theirs, ours, config, (reps_a.grad, reps_b.grad))
    per_record = [
        float(theirs(text_reps[b : b + 1], labels[b : b + 1], chosen[b : b + 1], text_tokens[b : b + 1]))
        for b in range(3)
    ]
    assert all(loss > 0 for loss in per_record)  # every record feasible: none hidden by zero_infinity
    # omnifast's defaults (causal text-guided attention, exact upsampling) compute something else
    default = speech_decoder_from_state_dict(
        theirs.state_dict(),
        SpeechDecoderConfig(**{**config.to_dict(), "fusion_causal": True, "upsample_rounding": "exact"}),
    ).double()
    assert abs(float(default(*ours_inputs(text_reps, labels, text_tokens), units=chosen).loss - loss_theirs)) > 1e-6


def test_the_openomni_preset_reproduces_openomnis_dpo_loss_and_gradients():
    config, text_reps, labels, text_tokens, chosen, rejected = problem(seed=1)
    theirs = openomni.SpeechGenerator(config).double()
    with torch.no_grad():  # a policy that has moved away from its reference
        for p in theirs.parameters():
            p.add_(0.01 * torch.randn_like(p))
    their_reference = openomni.frozen_copy(openomni.SpeechGenerator(config).double())
    their_reference.load_state_dict({k: v - 0.0 for k, v in theirs.state_dict().items()})
    with torch.no_grad():
        for p in their_reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = speech_decoder_from_state_dict(theirs.state_dict(), config).double()
    reference = speech_decoder_from_state_dict(their_reference.state_dict(), config).double()
    reps_a = text_reps.clone().requires_grad_()
    loss_theirs = openomni.dpo_loss(theirs, their_reference, reps_a, labels, chosen, rejected, text_tokens)
    loss_theirs.backward()
    reps_b = text_reps.clone().requires_grad_()
    states, tokens, hidden_mask, text_mask = ours_inputs(reps_b, labels, text_tokens)
    ref_w, ref_l = reference.reference_logps(
        states.detach(),
        tokens,
        chosen,
        rejected,
        hidden_mask=hidden_mask,
        text_mask=text_mask,
        normalization="openomni",
    )
    out = ours.dpo_loss(
        states,
        tokens,
        chosen,
        rejected,
        ref_w,
        ref_l,
        beta=0.1,
        hidden_mask=hidden_mask,
        text_mask=text_mask,
        normalization="openomni",
    )
    out.loss.backward()
    assert abs(float(loss_theirs) - 0.693147) > 1e-4  # not the trivial policy = reference
    torch.testing.assert_close(out.loss, loss_theirs.reshape(()), rtol=1e-12, atol=0)
    assert_grads_equal(theirs, ours, config, (reps_a.grad, reps_b.grad))


def test_openomni_upsampling_rounds_as_its_code_does():
    differ = 0
    for n in range(1, 35):
        for frames in range(12 * n, 12 * n + 140):
            x = torch.arange(float(n))[None, :, None]
            ours, _ = uniform_upsample(x, torch.tensor([n]), 12, torch.tensor([frames]), rounding="openomni")
            theirs = openomni.uniform_assignment(torch.tensor([n]), torch.tensor([frames]))[0]
            assert torch.equal(ours[0, :, 0].long(), theirs), (n, frames)
            exact, _ = uniform_upsample(x, torch.tensor([n]), 12, torch.tensor([frames]))
            differ += not torch.equal(exact, ours)
    assert differ > 0  # the two roundings part at some boundaries
    with pytest.raises(ValueError, match="upsample_rounding"):
        SpeechDecoderConfig(upsample_rounding="nearest")


@pytest.mark.parametrize("dpo", [False, True], ids=["stage 4", "stage 5"])
def test_the_patch_keeps_openomnis_losses_and_gradients(dpo):
    import copy

    from omnifast.openomni import patch

    config, text_reps, labels, text_tokens, chosen, rejected = problem(seed=2)
    plain = openomni.OpenOmniModel(config, dpo=dpo).double()
    if dpo:
        with torch.no_grad():
            for p in plain.get_model().speech_generator.parameters():
                p.add_(0.01 * torch.randn_like(p))
    patched = patch(copy.deepcopy(plain))
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in patched.named_parameters()]  # module names and weights kept
    results = []
    for model in (plain, patched):
        reps = text_reps.clone().requires_grad_()
        loss = model(reps, labels, chosen, rejected, text_tokens)
        loss.backward()
        results.append(
            (loss.detach(), reps.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-9, atol=1e-11)
    assert results[0][2].keys() == results[1][2].keys()
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, rtol=1e-9, atol=1e-11, msg=name)
    for _ in range(2):  # steps on the same input objects: each computes its own front end
        patched.zero_grad()
        plain.zero_grad()
        torch.testing.assert_close(
            patched(text_reps, labels, chosen, rejected, text_tokens),
            plain(text_reps, labels, chosen, rejected, text_tokens),
            rtol=1e-11,
            atol=1e-13,
        )
    with pytest.raises(ValueError, match="no OpenOmni speech generator"):
        patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dpo", [False, True], ids=["stage 4", "stage 5"])
def test_openomnis_modules_train_the_same_curve_patched_and_plain(dpo):
    """The convergence check of the patch: 20 AdamW steps in float32 on OpenOmni's rebuilt
    modules, with and without ``omnifast.openomni.patch``, trace one loss curve."""
    import copy

    from omnifast.openomni import patch

    config, text_reps, labels, text_tokens, chosen, rejected = problem(seed=3)
    torch.manual_seed(3)
    plain = openomni.OpenOmniModel(config, dpo=dpo)
    patched = patch(copy.deepcopy(plain))
    curves = []
    for model in (plain, patched):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = model(text_reps.float(), labels, chosen, rejected, text_tokens)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-5)
    assert curves[0][-3:].mean() < curves[0][:3].mean()
