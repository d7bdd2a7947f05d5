"""Speech decoder benchmark: one training step (forward + backward of the CTC loss) of
``omnifast.nn.SpeechDecoder`` against the same architecture run the way OpenOmni's
``SpeechGeneratorCTC`` runs it: the naive dense MoE (per-expert loop), the decoder called as a
``Qwen2ForCausalLM`` whose 151,936-word logits are formed on every frame and thrown away, and
full (B, T, V) unit logits -> log_softmax -> ``F.ctc_loss``. Both share the weights.

Shape fields: L decoder layers, W width (896: the OpenOmni sizes, LLM 3584 wide, 6561 units;
anything else: the tiny config at that width), B batch, N text tokens (x12 upsampling), U units.
Beside the table: streaming (``SpeechDecoder.stream``) first-unit latency and real-time factor
for 30 s of speech (750 units at 25 Hz). Run ``python -m benchmarks.speech_decoder``."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from omnifast.nn import NaiveMoE, SpeechDecoder, SpeechDecoderConfig, build_speech_decoder

from ._harness import Benchmark


def config_for(layers: int, width: int) -> SpeechDecoderConfig:
    if width == 896:
        return SpeechDecoderConfig(layers=layers)
    return SpeechDecoderConfig.tiny(layers=layers, width=width, intermediate=2 * width)


def make_inputs(shape, device: torch.device, seed: int = 0):
    L, W, B, N, U = shape
    torch.manual_seed(seed)
    config = config_for(L, W)
    decoder = build_speech_decoder(config).to(device)
    hidden = torch.randn(B, N, config.llm_hidden, device=device)
    tokens = torch.randint(0, config.text_vocab, (B, N), device=device)
    units = torch.randint(0, config.units, (B, U), device=device)
    return decoder, hidden, tokens, units


class OpenOmniStyle:
    """The OpenOmni way of computing the same loss with the same weights."""

    def __init__(self, decoder: SpeechDecoder):
        c = decoder.config
        self.decoder = decoder
        self.naive_moe = NaiveMoE(
            c.llm_hidden,
            c.width * c.split_tokens,
            c.width * c.split_tokens,
            experts=c.experts,
            split_tokens=c.split_tokens,
            gate_bias=True,
        ).to(decoder.moe.w1.device)
        self.naive_moe.load_state_dict(decoder.moe.state_dict())
        self.lm_head = torch.randn(c.text_vocab, c.width, device=decoder.moe.w1.device) * 0.02

    def loss(self, hidden, tokens, units):
        d, c = self.decoder, self.decoder.config
        fast_moe, d.moe = d.moe, self.naive_moe
        try:
            states, lengths = d.frame_states(hidden, tokens, min_frames=torch.full_like(tokens[:, 0], units.shape[1]))
        finally:
            d.moe = fast_moe
        wasted = F.linear(states, self.lm_head)  # Qwen2ForCausalLM's vocabulary logits, then discarded
        del wasted
        log_probs = torch.log_softmax(d.head(states).float(), -1).transpose(0, 1)
        unit_lengths = torch.full_like(lengths, units.shape[1])
        total = F.ctc_loss(log_probs, units, lengths, unit_lengths, blank=c.units, reduction="sum", zero_infinity=True)
        return total / unit_lengths.sum()


def implementations(inputs, device):
    decoder, hidden, tokens, units = inputs
    reference = OpenOmniStyle(decoder)

    def step(loss_fn):
        def run():
            decoder.zero_grad(set_to_none=True)
            loss_fn().backward()

        return run

    return {
        "OpenOmni-style": step(lambda: reference.loss(hidden, tokens, units)),
        "omnifast SpeechDecoder": step(lambda: decoder(hidden, tokens, units=units).loss),
    }


def streaming(quick: bool, device: torch.device):
    """First-unit latency and real-time factor of streaming 30 s of speech (750 frames at 25 Hz
    from 63 text tokens x 12), 4 text tokens per chunk, default-size decoder (tiny when quick)."""
    torch.manual_seed(0)
    config = SpeechDecoderConfig.tiny(upsample_factor=12) if quick else SpeechDecoderConfig()
    decoder = build_speech_decoder(config).to(device).eval()
    tokens_total, chunk = 63, 4
    hidden = torch.randn(tokens_total, config.llm_hidden, device=device)
    tokens = torch.randint(0, config.text_vocab, (tokens_total,), device=device)
    chunks = [(hidden[i : i + chunk], tokens[i : i + chunk]) for i in range(0, tokens_total, chunk)]
    list(decoder.stream(chunks[:1]))  # warm-up
    start = time.perf_counter()
    first_unit, count = None, 0
    for units in decoder.stream(chunks):
        count += len(units)
        if first_unit is None and units:
            first_unit = time.perf_counter() - start
    total = time.perf_counter() - start
    audio_s = tokens_total * config.upsample_factor / 25.0
    return {
        "streaming first-unit latency s": round(first_unit, 4),
        "streaming total s": round(total, 3),
        "streaming audio s": audio_s,
        "streaming real-time factor": round(total / audio_s, 4),
        "streaming units": count,
        "streaming chunk tokens": chunk,
        "streaming layers": config.layers,
    }


BENCHMARK = Benchmark(
    op="speech_decoder",
    module="benchmarks.speech_decoder",
    fields="LWBNU",
    shapes=[(4, 896, 4, 60, 300), (24, 896, 4, 60, 300)],
    quick_shapes=[(1, 32, 2, 6, 10)],
    make_inputs=make_inputs,
    implementations=implementations,
    baseline="OpenOmni-style",
    description=__doc__,
    extras=streaming,
)
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
