"""DPO for the AR speech decoder: its log-likelihoods of chosen and rejected units (one decoder
pass, fused per-row cross-entropy) equal the brute-force recipe's (full logits, log_softmax,
gather) in float64, forward and gradients, for every normalisation and backend; stage 5 trains an
AR decoder."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from omnifast.nn import SpeechDecoderConfig, build_speech_decoder
from omnifast.ops.dpo import normalize

CFG = SpeechDecoderConfig.tiny()


def problem(seed=0):
    torch.manual_seed(seed)
    B = 3
    hidden = torch.randn(B, 5, CFG.llm_hidden, dtype=torch.float64)
    tokens = torch.randint(0, CFG.text_vocab, (B, 5))
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 4])[:, None]
    chosen = torch.randint(0, CFG.units, (B, 7))
    rejected = torch.randint(0, CFG.units, (B, 9))
    chosen[1, 4:] = -100
    rejected[2, 6:] = -100
    return hidden, tokens, mask, chosen, rejected


def brute_force(decoder, hidden, tokens, mask, units):
    """Each sequence on its own: full logits over [sos | fused | task | units], log_softmax, gather."""
    out = []
    for b in range(hidden.shape[0]):
        n = int(mask[b].sum())
        real = units[b][units[b] != -100]
        fused, _ = decoder.fuse_text(hidden[b : b + 1, :n], tokens[b : b + 1, :n])
        sos, task = decoder.ar_specials.weight
        seq = torch.cat([sos[None], fused[0], task[None], decoder.unit_embedding(real)])[None]
        states = decoder.decoder(inputs_embeds=seq, use_cache=False).last_hidden_state[0]
        log_probs = F.log_softmax(decoder.head(states[n + 1 :]), -1)  # task and each unit predict the next
        targets = torch.cat([real, torch.tensor([CFG.units])])
        out.append(log_probs.gather(1, targets[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("normalization", ["sum", "length", "openomni"])
def test_ar_dpo_equals_the_brute_force_recipe(backend, normalization):
    hidden, tokens, mask, chosen, rejected = problem()
    torch.manual_seed(1)
    policy = build_speech_decoder(CFG, "ar", backend=backend).double()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    refs = reference.reference_logps(
        hidden, tokens, chosen, rejected, hidden_mask=mask, text_mask=mask, normalization=normalization
    )
    h1 = hidden.clone().requires_grad_()
    out = policy.dpo_loss(
        h1, tokens, chosen, rejected, *refs, beta=0.5, hidden_mask=mask, text_mask=mask, normalization=normalization
    )
    out.loss.backward()
    ours_grads = [p.grad.clone() for p in policy.parameters()] + [h1.grad]
    policy.zero_grad()
    h2 = hidden.clone().requires_grad_()
    len_w, len_l = (chosen != -100).sum(1) + 1, (rejected != -100).sum(1) + 1
    pw = normalize(brute_force(policy, h2, tokens, mask, chosen), len_w, normalization)
    pl = normalize(brute_force(policy, h2, tokens, mask, rejected), len_l, normalization)
    with torch.no_grad():
        rw = normalize(brute_force(reference, hidden, tokens, mask, chosen), len_w, normalization)
        rl = normalize(brute_force(reference, hidden, tokens, mask, rejected), len_l, normalization)
    expected = -F.logsigmoid(0.5 * ((pw - rw) - (pl - rl))).mean()
    expected.backward()
    # the triton backend's MoE GEMMs run float64 operands at float32 precision (as tl.dot does)
    rtol, atol = (1e-6, 1e-8) if backend == "triton" else (1e-8, 1e-10)
    torch.testing.assert_close(out.loss, expected, rtol=rtol, atol=atol * 1e-2)
    for ours, theirs in zip(ours_grads, [p.grad for p in policy.parameters()] + [h2.grad]):
        if theirs is None:
            continue
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def test_stage_5_trains_an_ar_decoder(tmp_path):
    from omnifast import cli
    from tests.training.test_training import write_data

    data = write_data(tmp_path / "data")
    from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer

    torch.manual_seed(0)
    config = OmniConfig.tiny()
    config.speech_decoder_mode = "ar"
    OmniModel(config).save_pretrained(tmp_path / "ar-model", OmniProcessor(build_tiny_tokenizer(), config))
    assert (
        cli.main(
            [
                "train",
                "--stage",
                "emotion-dpo",
                "--model",
                str(tmp_path / "ar-model"),
                "--data",
                str(data / "emotion-dpo.json"),
                "--out",
                str(tmp_path / "out"),
                "--max-steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and abs(losses[0] - 0.693147) < 1e-4
