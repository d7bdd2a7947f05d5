"""AR speech-decoder DPO: omnifast's (the reference's log-likelihoods cached once, as training
does; the policy's chosen and rejected in one decoder pass through the fused per-row
cross-entropy) against OpenOmni's four-pass recipe (the policy and a frozen reference each run
chosen and rejected, full (B, U, V) logits and log_softmax), forward and backward, on the same
``ARSpeechDecoder`` weights. OpenOmni's AR unit vocabulary (16,384), its decoder at a quarter of
its width, OpenOmni's batch normalisation. Run ``python -m benchmarks.ar_dpo``."""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from omnifast.nn import SpeechDecoderConfig, build_speech_decoder
from omnifast.ops.dpo import normalize

from ._harness import Benchmark


def make_inputs(shape, device, seed=0):
    B, N, U, V, layers = shape
    torch.manual_seed(seed)
    c = SpeechDecoderConfig(
        llm_hidden=512,
        width=224,
        fusion_heads=4,
        fusion_head_dim=56,
        layers=layers,
        heads=14,
        kv_heads=2,
        intermediate=1216,
        units=V,
        text_vocab=2048,
    )
    policy = build_speech_decoder(c, "ar").to(device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    hidden = torch.randn(B, N, c.llm_hidden, device=device)
    tokens = torch.randint(0, c.text_vocab, (B, N), device=device)
    chosen, rejected = (torch.randint(0, V, (B, U), device=device) for _ in range(2))
    return policy, reference, hidden, tokens, chosen, rejected


def recipe_logps(decoder, hidden, tokens, units):
    """One full-logits pass: [sos | fused | task | units], log_softmax over the vocabulary, gather."""
    fused, lengths = decoder.fuse_text(hidden, tokens)
    B, N, _ = fused.shape
    sos, task = decoder.ar_specials.weight
    seq = torch.cat([sos.expand(B, 1, -1), fused, task.expand(B, 1, -1), decoder.unit_embedding(units)], 1)
    states = decoder.decoder(inputs_embeds=seq, use_cache=False).last_hidden_state[:, N + 1 :]
    log_probs = F.log_softmax(decoder.head(states).float(), -1)
    targets = torch.cat([units, torch.full((B, 1), decoder.config.units, device=units.device)], 1)
    return log_probs.gather(2, targets[..., None]).squeeze(-1).sum(1)


def implementations(inputs, device):
    policy, reference, hidden, tokens, chosen, rejected = inputs
    B, U = chosen.shape
    lengths = torch.full((B,), U + 1, device=device)
    with torch.no_grad():
        refs = reference.reference_logps(hidden, tokens, chosen, rejected, normalization="openomni")

    def ours():
        policy.zero_grad(set_to_none=True)
        policy.dpo_loss(hidden, tokens, chosen, rejected, *refs, normalization="openomni").loss.backward()

    def four_pass():
        policy.zero_grad(set_to_none=True)
        pw = normalize(recipe_logps(policy, hidden, tokens, chosen), lengths, "openomni")
        pl = normalize(recipe_logps(policy, hidden, tokens, rejected), lengths, "openomni")
        with torch.no_grad():
            rw = normalize(recipe_logps(reference, hidden, tokens, chosen), lengths, "openomni")
            rl = normalize(recipe_logps(reference, hidden, tokens, rejected), lengths, "openomni")
        (-F.logsigmoid(0.1 * ((pw - rw) - (pl - rl)))).mean().backward()

    return {"OpenOmni four-pass": four_pass, "omnifast": ours}


BENCHMARK = Benchmark(
    op="ar_dpo",
    module="benchmarks.ar_dpo",
    fields=("B", "N", "U", "V", "layers"),
    shapes=[(4, 40, 400, 16384, 6)],
    quick_shapes=[(2, 6, 20, 64, 1)],
    make_inputs=make_inputs,
    implementations=implementations,
    baseline="OpenOmni four-pass",
    description=__doc__,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
