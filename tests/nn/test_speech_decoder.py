"""The speech decoder at tiny size: shapes, the fused loss against F.ctc_loss on full logits,
overfitting one batch, streaming against one full pass, the AR mode, CTC-DPO against its formula,
OpenOmni checkpoint loading, and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnifast.nn import SpeechDecoderConfig, TextGuidedModule, build_speech_decoder
from omnifast.nn.speech_decoder import uniform_upsample
from omnifast.openomni import speech_decoder_from_state_dict

from ..devices import device_for

CFG = SpeechDecoderConfig.tiny()
DEVICE = device_for()  # the test device (tests/devices.py): the decoder runs on its default backend there


def batch(seed=0, lengths=(7, 5, 3), units=None, dtype=torch.float32, config=CFG):
    units = units or tuple(2 * n for n in lengths)
    gen = torch.Generator().manual_seed(seed)
    B, N = len(lengths), max(lengths)
    hidden = torch.randn(B, N, config.llm_hidden, generator=gen, dtype=dtype)
    tokens = torch.randint(0, config.text_vocab, (B, N), generator=gen)
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    targets = torch.randint(0, config.units, (B, max(units)), generator=gen)
    targets[torch.arange(max(units))[None] >= torch.tensor(units)[:, None]] = -100
    return hidden.to(DEVICE), tokens.to(DEVICE), mask.to(DEVICE), targets.to(DEVICE)


def full_logits_ctc(decoder, states, lengths, targets, reduction):
    log_probs = torch.log_softmax(decoder.head(states), -1).transpose(0, 1)
    unit_lengths = (targets != -100).sum(1)
    loss = F.ctc_loss(
        log_probs,
        targets.clamp(min=0),
        lengths,
        unit_lengths,
        blank=decoder.config.units,
        reduction="sum" if reduction == "openomni" else "mean",
        zero_infinity=True,
    )
    return loss / unit_lengths.sum() if reduction == "openomni" else loss


def test_shapes_and_frame_counts():
    torch.manual_seed(0)
    decoder = build_speech_decoder(CFG).to(DEVICE)
    hidden, tokens, mask, targets = batch(units=(30, 9, 4))
    out = decoder(hidden, tokens, mask, mask, targets)
    # frames = max(text length x 3, units): 7*3=21 < 30
    assert out.lengths.tolist() == [30, 15, 9] and out.states.shape == (3, 30, CFG.width)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert decoder(hidden, tokens, mask, mask).lengths.tolist() == [21, 15, 9]


def test_uniform_upsample_assignment():
    x = torch.arange(3.0)[None, :, None].expand(2, 3, 1)
    frames, lengths = uniform_upsample(x, torch.tensor([3, 2]), 2, torch.tensor([4, 5]))
    assert lengths.tolist() == [6, 5]
    assert frames[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert frames[1, :, 0].tolist() == [0, 0, 0, 1, 1, 0]  # 5 frames over 2 rows, then padding


@pytest.mark.gpu_check(6)
@pytest.mark.parametrize("normalization", ["openomni", "mean"])
def test_fused_loss_equals_ctc_on_full_logits(normalization):
    torch.manual_seed(1)
    decoder = build_speech_decoder(SpeechDecoderConfig.tiny(loss_normalization=normalization)).double().to(DEVICE)
    hidden, tokens, mask, targets = batch(seed=1, dtype=torch.float64)
    ours = decoder(hidden, tokens, mask, mask, targets)
    ours_grads = torch.autograd.grad(ours.loss, list(decoder.parameters()), retain_graph=True)
    reference = full_logits_ctc(decoder, ours.states, ours.lengths, targets, normalization)
    reference_grads = torch.autograd.grad(reference, list(decoder.parameters()))
    torch.testing.assert_close(ours.loss.double(), reference.double())
    for (name, _), a, b in zip(decoder.named_parameters(), ours_grads, reference_grads):
        # the MoE's router runs in float32: gradients reaching the gate and what feeds it
        # (the sos/task embeddings) carry float32 rounding
        router_bound = name.startswith(("moe.gate", "specials"))
        torch.testing.assert_close(
            a, b, **(dict(atol=1e-6, rtol=1e-4) if router_bound else dict(atol=1e-10, rtol=1e-8))
        )


def test_overfitting_one_batch_then_greedy_decoding_returns_the_targets():
    torch.manual_seed(0)
    config = SpeechDecoderConfig.tiny(width=64, intermediate=128)
    decoder = build_speech_decoder(config).to(DEVICE)
    hidden, tokens, mask, targets = batch(seed=0, lengths=(6, 4), units=(6, 4), config=config)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = decoder(hidden, tokens, mask, mask, targets).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    decoder.eval()
    expected = [row[row != -100].tolist() for row in targets]
    assert decoder.generate(hidden, tokens, mask, mask) == expected


@pytest.mark.gpu_check(6)
@pytest.mark.parametrize("chunk", [1, 2, 3, 9])
def test_streaming_equals_one_full_pass(chunk):
    torch.manual_seed(3)
    decoder = build_speech_decoder(CFG).double().eval().to(DEVICE)
    hidden, tokens, _, _ = batch(seed=3, lengths=(9,), dtype=torch.float64)
    full = decoder.generate(hidden, tokens)[0]
    streamed = []
    for units in decoder.stream((hidden[0, i : i + chunk], tokens[0, i : i + chunk]) for i in range(0, 9, chunk)):
        streamed += units
    assert streamed == full and len(full) > 0


def test_bidirectional_decoder_sees_the_future_and_cannot_stream():
    torch.manual_seed(4)
    decoder = build_speech_decoder(SpeechDecoderConfig.tiny(causal=False, fusion_causal=False)).double().to(DEVICE)
    hidden, tokens, _, _ = batch(seed=4, lengths=(5,), dtype=torch.float64)
    first = decoder(hidden, tokens).states
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % CFG.text_vocab
    assert (decoder(hidden, changed).states[0, 0] - first[0, 0]).abs().max() > 1e-6
    causal = build_speech_decoder(CFG).double().to(DEVICE)
    causal.load_state_dict(decoder.state_dict())
    a, b = causal(hidden, tokens).states, causal(hidden, changed).states
    torch.testing.assert_close(a[0, :12], b[0, :12])  # frames of the first 4 tokens: unchanged
    with pytest.raises(ValueError, match="causal"):
        next(decoder.stream([(hidden[0], tokens[0])]))


def test_text_guided_module_ignores_padding_and_hidden_context():
    torch.manual_seed(5)
    module = TextGuidedModule(16, depth=2, heads=2, head_dim=8).double()
    queries, context = torch.randn(2, 4, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = module(queries, context, mask)
    noisy = context.clone()
    noisy[1, 3:] = 100.0
    torch.testing.assert_close(module(queries, noisy, mask), out)
    torch.testing.assert_close(module(queries[1:], context[1:, :3]), out[1:])
    groups = torch.tensor([[-1, 0, 0, 1, 1, 2]] * 2)
    causal = module(queries, context, None, groups)
    torch.testing.assert_close(causal[:, 0], module(queries[:, :1], context[:, :3])[:, 0])


def ar_reference_loss(decoder, hidden, tokens, mask, targets):
    fused, text_lengths = decoder.fuse_text(hidden, tokens, mask, mask)
    losses = []
    for b in range(hidden.shape[0]):
        L, units = int(text_lengths[b]), targets[b][targets[b] != -100]
        sos, task = decoder.ar_specials.weight
        seq = torch.cat([sos[None], fused[b, :L], task[None], decoder.unit_embedding(units)])[None]
        states = decoder.decoder(inputs_embeds=seq).last_hidden_state[0]
        logits = decoder.head(states[L + 1 :])  # task predicts unit 0, ..., the last unit predicts eos
        eos = torch.tensor([decoder.config.units], device=units.device)
        losses.append(F.cross_entropy(logits, torch.cat([units, eos]), reduction="sum"))
    return sum(losses) / ((targets != -100).sum() + hidden.shape[0])


def test_ar_loss_equals_next_unit_cross_entropy_and_sampling_learns():
    torch.manual_seed(6)
    decoder = build_speech_decoder(SpeechDecoderConfig.tiny(layers=1), mode="ar").double().to(DEVICE)
    hidden, tokens, mask, targets = batch(seed=6, lengths=(4, 3), units=(6, 3), dtype=torch.float64)
    torch.testing.assert_close(
        decoder(hidden, tokens, mask, mask, targets).loss.double(),
        ar_reference_loss(decoder, hidden, tokens, mask, targets),
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(60):
        loss = decoder(hidden, tokens, mask, mask, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    expected = [row[row != -100].tolist() for row in targets]
    assert decoder.generate(hidden, tokens, mask, mask, greedy=True) == expected
    sampled = decoder.generate(
        hidden,
        tokens,
        mask,
        mask,
        top_k=3,
        top_p=0.9,
        max_units=4,
        generator=torch.Generator(device=DEVICE).manual_seed(0),
    )
    assert all(len(units) <= 4 for units in sampled)


def test_dpo_loss_equals_the_formula_on_the_decoders_own_likelihoods():
    torch.manual_seed(7)
    decoder = build_speech_decoder(CFG).double().to(DEVICE)
    reference = copy.deepcopy(decoder)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hidden, tokens, mask, chosen = batch(seed=7, units=(12, 9, 4), dtype=torch.float64)
    _, _, _, rejected = batch(seed=8, units=(10, 11, 2))
    ref_chosen, ref_rejected = reference.reference_logps(
        hidden, tokens, chosen, rejected, hidden_mask=mask, text_mask=mask
    )
    out = decoder.dpo_loss(
        hidden, tokens, chosen, rejected, ref_chosen, ref_rejected, beta=0.5, hidden_mask=mask, text_mask=mask
    )

    def logps(model, units):
        frames = torch.maximum((chosen != -100).sum(1), (rejected != -100).sum(1))
        states, lengths = model.frame_states(hidden, tokens, mask, mask, frames)
        log_probs = torch.log_softmax(model.head(states), -1).transpose(0, 1)
        return -F.ctc_loss(
            log_probs, units.clamp(min=0), lengths, (units != -100).sum(1), blank=CFG.units, reduction="none"
        )

    with torch.no_grad():
        torch.testing.assert_close(ref_chosen, logps(reference, chosen))
        torch.testing.assert_close(ref_rejected, logps(reference, rejected))
    margin = (logps(decoder, chosen) - ref_chosen) - (logps(decoder, rejected) - ref_rejected)
    expected = -F.logsigmoid(0.5 * margin).mean()
    torch.testing.assert_close(out.loss.double(), expected)


# ---- an OpenOmni-style speech generator: the same module names and key layout ----------------
class _Expert(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)


class _Gate(nn.Module):
    def __init__(self, d_in, experts):
        super().__init__()
        self.fc = nn.Linear(d_in, experts)


class _ExpertStack(nn.Module):
    def __init__(self, d_in, d_out, experts):
        super().__init__()
        self.experts = nn.ModuleList(_Expert(d_in, d_out) for _ in range(experts))
        self.gate = _Gate(d_in, experts)

    def forward(self, x):
        scores = torch.softmax(self.gate.fc(x), -1)
        outs = torch.stack([e.fc2(torch.relu(e.fc1(x))) for e in self.experts], -2)
        return (scores[..., None] * outs).sum(-2)


class _Attention(nn.Module):
    def __init__(self, dim, head_dim, heads):
        super().__init__()
        self.heads, inner = heads, head_dim * heads
        self.norm_text, self.norm_image = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context, queries, context_mask):
        B = queries.shape[0]
        q = self.to_q(self.norm_image(queries))
        k, v = self.to_kv(self.norm_text(context)).chunk(2, -1)
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        return self.to_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, queries.shape[1], -1))


class OpenOmniLikeGenerator(nn.Module):
    def __init__(self, c: SpeechDecoderConfig):
        super().__init__()
        from transformers import Qwen2ForCausalLM

        self.c = c
        self.input_proj = _ExpertStack(c.llm_hidden, c.width * 4, c.experts)
        self.llm_embedding = nn.Embedding(2, c.llm_hidden)
        self.llm_decoder = nn.Linear(c.width, c.units + 1)
        ff = lambda: nn.Sequential(
            nn.LayerNorm(c.width),
            nn.Linear(c.width, c.width * c.fusion_ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(c.width * c.fusion_ff_mult, c.width, bias=False),
        )
        self.fusion = nn.Module()
        self.fusion.layers = nn.ModuleList(
            nn.ModuleList([_Attention(c.width, c.fusion_head_dim, c.fusion_heads), ff()]) for _ in range(c.fusion_depth)
        )
        self.fusion.norm = nn.LayerNorm(c.width)
        self.llm = nn.Module()
        self.llm.model = Qwen2ForCausalLM(c.qwen2())

    def logits(self, hidden, tokens):  # one sequence, no padding
        sos, task = self.llm_embedding.weight
        context = self.input_proj(torch.cat([sos[None], hidden[0], task[None]])[None])
        B, n, _ = context.shape
        context = context.view(B, n, self.c.width, 4).transpose(2, 3).reshape(B, n * 4, self.c.width)
        x = self.llm.model.model.embed_tokens(tokens)
        mask = torch.ones(B, n * 4, dtype=torch.bool)
        for attention, ff in self.fusion.layers:
            x = attention(context, x, mask) + x
            x = ff(x) + x
        x = self.fusion.norm(x).repeat_interleave(self.c.upsample_factor, 1)
        states = self.llm.model(inputs_embeds=x, output_hidden_states=True).hidden_states[-1]
        return self.llm_decoder(states)


def test_openomni_state_dict_loads_and_computes_the_same():
    torch.manual_seed(8)
    config = SpeechDecoderConfig.tiny(fusion_causal=False)  # OpenOmni's fusion sees all LLM states
    theirs = OpenOmniLikeGenerator(config).double()
    state = {f"speech_generator.{k}": v for k, v in theirs.state_dict().items()}
    ours = speech_decoder_from_state_dict(state, config, prefix="speech_generator.").double()
    hidden, tokens, _, _ = (t.cpu() for t in batch(seed=8, lengths=(6,), dtype=torch.float64, config=config))
    states, _ = ours.frame_states(hidden, tokens)
    torch.testing.assert_close(ours.head(states), theirs.logits(hidden, tokens))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden=torch.randn(2, 4, 7)), "llm_hidden"),
        (dict(text_tokens=torch.zeros(3, 4, dtype=torch.long)), "batch size"),
        (dict(hidden_mask=torch.ones(2, 5, dtype=torch.bool)), "hidden_mask"),
        (dict(text_mask=torch.tensor([[True, False, True, True]] * 2)), "text_mask"),
        (dict(units=torch.tensor([[1, 2], [3, CFG.units]])), "units"),
        (dict(units=torch.tensor([[1, -5], [3, 4]])), "units"),
        (dict(text_tokens=torch.full((2, 4), CFG.text_vocab)), "text_tokens"),
    ],
)
def test_bad_input(change, match):
    decoder = build_speech_decoder(CFG)
    args = dict(
        hidden=torch.randn(2, 4, CFG.llm_hidden),
        text_tokens=torch.zeros(2, 4, dtype=torch.long),
        hidden_mask=None,
        text_mask=None,
        units=torch.tensor([[1, 2], [3, 4]]),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        decoder(**args)


def test_bad_config_and_stream_chunks():
    with pytest.raises(ValueError, match="upsample_factor"):
        SpeechDecoderConfig.tiny(upsample_factor=0)
    with pytest.raises(ValueError, match="mode"):
        build_speech_decoder(CFG, mode="diffusion")
    with pytest.raises(ValueError, match="factor"):
        uniform_upsample(torch.zeros(1, 2, 3), torch.tensor([2]), 0)
    decoder = build_speech_decoder(CFG)
    with pytest.raises(ValueError, match="one LLM state per text token"):
        next(decoder.stream([(torch.randn(3, CFG.llm_hidden), torch.zeros(2, dtype=torch.long))]))
    with pytest.raises(ValueError, match="chunk size"):
        next(decoder.stream([(torch.randn(0, CFG.llm_hidden), torch.zeros(0, dtype=torch.long))]))
    with pytest.raises(ValueError, match="mode"):
        decoder.sample_units(torch.randn(1, 2, CFG.llm_hidden), torch.zeros(1, 2, dtype=torch.long))
