"""The modules under ``torch.autocast`` (bf16, fp16) and with bf16 parameters, on every backend:
the speech decoder's CTC and CTC-DPO losses and every parameter gradient against float32.

Stated tolerance: the omnifast torch backend's own error against float32 stays under
BOUND[dtype] (relative, losses and the whole gradient vector), and every kernel backend's error
is at most twice the torch backend's (plus 1e-3 relative slack)."""

import contextlib

import pytest
import torch

from omnifast.nn import LinearCTCHead, SpeechDecoderConfig, build_speech_decoder

from ..devices import device_for
from .test_speech_decoder import batch

MODES = {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16, "bf16-params": torch.bfloat16}
BOUND = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def decoder_losses(backend, mode, seed=0):
    """(CTC loss, DPO loss) and the flat gradient of their sum, in ``mode`` (None: float32)."""
    device = device_for(backend)
    torch.manual_seed(seed)
    decoder = build_speech_decoder(SpeechDecoderConfig.tiny(), backend=backend).to(device)
    hidden, tokens, mask, units = (t.to(device) for t in batch(seed=seed))
    context = contextlib.nullcontext()
    if mode is not None and mode.startswith("autocast"):
        context = torch.autocast(device.type, dtype=MODES[mode])
    elif mode is not None:
        decoder, hidden = decoder.to(MODES[mode]), hidden.to(MODES[mode])
    rejected = torch.where(units >= 0, (units + 7) % decoder.config.units, units)  # same lengths, other units
    with context:
        ctc = decoder(hidden, tokens, mask, mask, units).loss
        refs = decoder.reference_logps(hidden.detach(), tokens, units, rejected, hidden_mask=mask, text_mask=mask)
        dpo = decoder.dpo_loss(
            hidden, tokens, units, rejected, refs[0] - 1.0, refs[1] + 1.0, hidden_mask=mask, text_mask=mask
        ).loss
    assert ctc.dtype == torch.float32 and dpo.dtype == torch.float32
    params = [p for p in decoder.parameters()]
    grads = torch.autograd.grad(ctc + dpo, params, allow_unused=True)
    for p, g in zip(params, grads):
        assert g is None or g.dtype == p.dtype
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for p, g in zip(params, grads)])
    return torch.stack([ctc.detach(), dpo.detach()]).cpu(), flat.cpu()


def relative_errors(result, exact):
    (losses, grad), (exact_losses, exact_grad) = result, exact
    return ((losses - exact_losses).abs() / exact_losses.abs()).max().item(), (
        (grad - exact_grad).norm() / exact_grad.norm()
    ).item()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_speech_decoder_in_mixed_precision(backend, mode):
    exact = decoder_losses("torch", None)
    reference = relative_errors(decoder_losses("torch", mode), exact)
    assert max(reference) < BOUND[MODES[mode]], reference
    ours = relative_errors(decoder_losses(backend, mode), exact)
    for a, r in zip(ours, reference):
        assert a <= 2 * r + 1e-3, (ours, reference)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_linear_ctc_head_under_autocast_keeps_its_float32_weights(backend):
    device = device_for(backend)
    head = LinearCTCHead(8, 11, backend=backend).to(device)
    hidden = torch.randn(2, 9, 8, device=device, requires_grad=True)
    units = torch.randint(0, 11, (2, 3), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = head.loss(hidden, units, [9, 7], [3, 2])
    loss.backward()
    assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()
