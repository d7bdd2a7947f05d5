"""OpenOmni's speech generator and its DPO, rebuilt from the definitions in its code
(``openomni/model/speech_generator_ctc/speech_generator.py``: ``MoE``, ``RLSIAT``,
``_uniform_assignment``, ``SpeechGeneratorCTC.forward``; ``language_model/llava_her_qwen.py``: the
DPO of ``tune_speech_generator_dpo``), with its module names and key layout, batched and padded
as it batches and pads: the ground truth the OpenOmni preset and ``omnifast.openomni.patch`` must
reproduce (in float64, in the tests) and the baseline they are timed against;
its only departure is that the log-softmax runs in the model's dtype (OpenOmni's ``.float()``
would round a float64 test to float32)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from omnifast.nn import SpeechDecoderConfig

IGNORE = -100


class Expert(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Gate(nn.Module):
    def __init__(self, d_in, experts):
        super().__init__()
        self.fc = nn.Linear(d_in, experts)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=-1)


class ExpertMixture(nn.Module):
    def __init__(self, d_in, d_out, experts):
        super().__init__()
        self.experts = nn.ModuleList(Expert(d_in, d_out) for _ in range(experts))
        self.gate = Gate(d_in, experts)

    def forward(self, x):
        B, N, D = x.shape
        flat = x.reshape(-1, D)
        scores = self.gate(flat).view(B, N, -1)
        outs = torch.stack([e(flat).view(B, N, -1) for e in self.experts], dim=1).permute(0, 2, 1, 3)
        return (scores.unsqueeze(-1) * outs).sum(dim=2)


class CrossAttention(nn.Module):
    def __init__(self, dim, head_dim, heads):
        super().__init__()
        self.scale, self.heads = head_dim**-0.5, heads
        inner = head_dim * heads
        self.norm_text, self.norm_image = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context, queries, context_mask):
        context, queries = self.norm_text(context), self.norm_image(queries)
        B, h = queries.shape[0], self.heads
        q = self.to_q(queries)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.view(B, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q * self.scale, k)
        sim = sim.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
        return self.to_out(out.transpose(1, 2).reshape(B, queries.shape[1], -1))


def feed_forward(dim, mult):
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class Fusion(nn.Module):
    """RLSIAT: the queries (the decoder's text embeddings) attend to the expanded LLM states."""

    def __init__(self, dim, depth, head_dim, heads, ff_mult):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, head_dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, text_reps, image_reps, text_mask=None, image_mask=None):  # OpenOmni's names: context, queries
        for attention, ff in self.layers:
            image_reps = attention(text_reps, image_reps, text_mask) + image_reps
            image_reps = ff(image_reps) + image_reps
        return self.norm(image_reps)


def uniform_assignment(src_lens, tgt_lens):
    """OpenOmni's ``_uniform_assignment``: int64 / float in the default dtype, truncated."""
    indices = torch.arange(int(tgt_lens.max())).expand(len(tgt_lens), -1)
    ratio = tgt_lens / src_lens
    return (indices / ratio.view(-1, 1)).long()


class SpeechGenerator(nn.Module):
    """``SpeechGeneratorCTC`` with a small decoder: its forward returns the CTC loss of a batch,
    summed over the batch and divided by its total units."""

    def __init__(self, c: SpeechDecoderConfig):
        super().__init__()
        from transformers import Qwen2ForCausalLM

        self.c = c
        self.input_proj = ExpertMixture(c.llm_hidden, c.width * c.split_tokens, c.experts)
        self.llm_embedding = nn.Embedding(2, c.llm_hidden)
        self.llm_decoder = nn.Linear(c.width, c.units + 1)
        self.fusion = Fusion(c.width, c.fusion_depth, c.fusion_head_dim, c.fusion_heads, c.fusion_ff_mult)
        self.llm = nn.Module()
        self.llm.model = Qwen2ForCausalLM(c.qwen2())
        self.sos_eos, self.task_id, self.unit_vocab_size, self.upsample_factor = 0, 1, c.units, c.upsample_factor

    def upsample(self, reps, tgt_units=None):
        """OpenOmni's: (frames, attention mask, position ids) of the text embeddings ``reps``."""
        src_lens = torch.tensor([len(r) for r in reps])
        up_lens = src_lens * self.upsample_factor
        if tgt_units is not None:
            up_lens = torch.maximum(up_lens, (tgt_units != IGNORE).sum(-1))
        reps = nn.utils.rnn.pad_sequence(reps, batch_first=True, padding_value=0)
        padding = torch.arange(int(up_lens.max()))[None] >= up_lens[:, None]
        mapped = uniform_assignment(src_lens, up_lens).masked_fill(padding, 0)
        frames = reps.gather(1, mapped[..., None].expand(-1, -1, reps.shape[-1])).masked_fill(padding[..., None], 0)
        return frames, ~padding, torch.arange(frames.shape[1])[None].expand(len(reps), -1)

    def forward(self, text_reps, text_labels, speech_tokens, text_tokens):
        c, S = self.c, self.c.split_tokens
        sos, task = self.llm_embedding.weight
        reps = [torch.cat([sos[None], rep[label != IGNORE], task[None]]) for rep, label in zip(text_reps, text_labels)]
        rep_lens = torch.tensor([len(r) * S for r in reps])
        key_mask = torch.arange(int(rep_lens.max()))[None] < rep_lens[:, None]
        context = self.input_proj(nn.utils.rnn.pad_sequence(reps, batch_first=True))
        B, N, O = context.shape
        context = context.view(B, N, O // S, S).transpose(2, 3).reshape(B, N * S, O // S)  # b n (d1 d2) -> b (n d2) d1
        text_lens = (text_tokens != IGNORE).sum(-1)
        text = nn.utils.rnn.pad_sequence([t[t != IGNORE] for t in text_tokens], batch_first=True, padding_value=0)
        fused = self.fusion(context, self.llm.model.model.embed_tokens(text), key_mask, None)
        frames, attention_mask, positions = self.upsample([f[:n] for n, f in zip(text_lens, fused)], speech_tokens)
        hidden = self.llm.model(
            inputs_embeds=frames, attention_mask=attention_mask, position_ids=positions, output_hidden_states=True
        ).hidden_states[-1]  # its vocabulary logits formed too
        log_probs = F.log_softmax(self.llm_decoder(hidden), dim=-1)
        units_lens = (speech_tokens != IGNORE).sum(-1)
        targets = speech_tokens[speech_tokens != IGNORE]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            attention_mask.sum(-1),
            units_lens,
            reduction="sum",
            zero_infinity=True,
            blank=c.units,
        )
        return loss / units_lens.sum()


def dpo_loss(generator, reference, text_reps, text_labels, chosen, rejected, text_tokens, beta=0.1):
    """OpenOmni's DPO: four generator calls, each a batch scalar."""
    win = -generator(text_reps, text_labels, chosen, text_tokens)
    lose = -generator(text_reps, text_labels, rejected, text_tokens)
    with torch.no_grad():
        win_ref = -reference(text_reps, text_labels, chosen, text_tokens)
        lose_ref = -reference(text_reps, text_labels, rejected, text_tokens)
    return -F.logsigmoid(beta * ((win - lose) - (win_ref - lose_ref)))


def frozen_copy(module):
    return copy.deepcopy(module).requires_grad_(False)


class OpenOmniModel(nn.Module):
    """The part of OpenOmni's ``forward`` (``llava_her_qwen.py``) a patch touches: its inner model
    holds ``speech_generator`` (and ``copy_speech_generator``, the DPO reference); given the LLM's
    states it returns the stage-4 CTC loss or, with ``tune_speech_generator_dpo``, the DPO loss."""

    def __init__(self, c: SpeechDecoderConfig, dpo: bool = False):
        super().__init__()
        self.inner = nn.Module()
        self.inner.speech_generator = SpeechGenerator(c)
        self.inner.tune_speech_generator_dpo = dpo
        if dpo:
            self.inner.copy_speech_generator = frozen_copy(self.inner.speech_generator)

    def get_model(self):
        return self.inner

    def forward(self, hidden_states, labels, tgt_units, re_tgt_units=None, text_tokens=None):
        inner = self.get_model()
        if not inner.tune_speech_generator_dpo:
            return inner.speech_generator(hidden_states, labels, tgt_units, text_tokens)
        return dpo_loss(
            inner.speech_generator,
            inner.copy_speech_generator,
            hidden_states,
            labels,
            tgt_units,
            re_tgt_units,
            text_tokens,
        )
