"""``OmniModel``: an LLM that sees (CLIP vision tower + MLP projector), hears (Whisper encoder +
frame-stacking projector) and speaks (``SpeechDecoder`` on its hidden states), assembled from
``transformers`` architectures. Building from a config downloads nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from omnifast.constants import IGNORE_INDEX
from omnifast.nn.decoders import build_speech_decoder
from omnifast.nn.packing import run_packed, unpack
from omnifast.ops.linear_cross_entropy import linear_cross_entropy

from .config import OmniConfig
from .generation import AnswerEvent, GenerateOutput, OmniGeneration
from .weights import load_weights, rebuild_buffers, save_weights, weight_files

__all__ = [
    "OmniModel",
    "OmniOutput",
    "AnswerEvent",
    "GenerateOutput",
    "SpeechProjector",
    "CTCPosteriorProjector",
    "COMPONENTS",
    "response_states",
    "rebuild_buffers",
    "vision_classes",
]

COMPONENTS = ("llm", "vision", "speech", "image_projector", "speech_projector", "speech_decoder", "speech_ctc_head")
CONFIG_NAME = "omnifast_config.json"


@dataclass
class OmniOutput:
    loss: Optional[torch.Tensor]  # text loss + speech loss (those present)
    text_loss: Optional[torch.Tensor]
    speech_loss: Optional[torch.Tensor]
    hidden_states: torch.Tensor  # (B, S, H) last LLM layer


class SpeechProjector(nn.Module):
    """Concatenate ``stack`` consecutive encoder frames -> Linear -> ReLU -> Linear."""

    def __init__(self, encoder_width: int, stack: int, hidden: int, out: int):
        super().__init__()
        self.stack = stack
        self.net = nn.Sequential(nn.Linear(encoder_width * stack, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, T, D = frames.shape
        return self.net(frames[:, : T - T % self.stack].reshape(n, T // self.stack, D * self.stack))


class CTCPosteriorProjector(nn.Module):
    """Speech as soft text: each encoder frame's CTC posteriors over the LLM's tokens (blank last)
    weigh the LLM's token embeddings, the blank's share a learned embedding; ``stack`` consecutive
    frames are averaged into one LLM position. A frame read as token t with certainty enters the
    LLM as t's embedding, so what the LLM learned from text applies to speech unchanged.

    ``compress=True`` (CTC compression): the frames are merged by their greedy CTC reading
    instead of by ``stack``: each run of frames read as the same token becomes one position, the
    mean of its frames' posteriors over the tokens alone (the blank's share renormalised away)
    weighing the embeddings; blank frames are dropped. The read tokens fill the clip's last
    positions in order (the earliest dropped if there are more than positions) and the learned
    blank fills the rest, so a clip read correctly enters the LLM as its transcript's embeddings.
    Gradients reach the posteriors of the frames read as tokens; the reading itself is discrete."""

    def __init__(self, stack: int, hidden: int, compress: bool = False):
        super().__init__()
        self.stack = stack
        self.compress = compress
        self.blank = nn.Parameter(torch.zeros(hidden))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.blank.zero_()

    def forward(self, ctc_logits: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        return self.project(ctc_logits, token_embeddings)[0]

    def project(
        self, ctc_logits: torch.Tensor, token_embeddings: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(n, T, tokens + 1) logits -> the positions (n, T // stack, H) and, compressed, which
        of them hold a read token (n, T // stack) bool (None otherwise)."""
        n, T, classes = ctc_logits.shape
        if classes != token_embeddings.shape[0] + 1:
            raise ValueError(
                f"ctc_logits have {classes} classes; the LLM has {token_embeddings.shape[0]} tokens + the blank"
            )
        kept = ctc_logits[:, : T - T % self.stack]
        compute = torch.promote_types(kept.dtype, torch.float32)
        blank = self.blank.to(token_embeddings.dtype)
        if self.compress:
            return self._compressed(kept, token_embeddings, blank, compute)
        probs = kept.softmax(-1, dtype=compute).to(token_embeddings.dtype)
        mixed = probs[..., :-1] @ token_embeddings + probs[..., -1:] * blank
        return mixed.reshape(n, T // self.stack, self.stack, -1).mean(2), None

    def _compressed(self, logits, token_embeddings, blank, compute):
        n, T, classes = logits.shape
        slots = T // self.stack
        reading = logits.argmax(-1)
        spoken = reading != classes - 1
        starts = spoken.clone()
        starts[:, 1:] &= reading[:, 1:] != reading[:, :-1]
        count = starts.sum(1, keepdim=True)
        slot = starts.cumsum(1) - 1 + (slots - count)  # right-aligned; < 0: dropped
        keep = spoken & (slot >= 0)
        flat = (torch.arange(n, device=logits.device)[:, None] * slots + slot)[keep]
        probs = logits[keep][:, :-1].softmax(-1, dtype=compute).to(token_embeddings.dtype)
        hidden = token_embeddings.shape[1]
        sums = probs.new_zeros(n * slots, classes - 1).index_add(0, flat, probs)
        frames = torch.zeros(n * slots, device=logits.device, dtype=probs.dtype).index_add(
            0, flat, torch.ones_like(flat, dtype=probs.dtype)
        )
        read = (sums / frames.clamp(min=1)[:, None]) @ token_embeddings
        out = torch.where((frames > 0)[:, None], read, blank.expand(n * slots, hidden))
        return out.reshape(n, slots, hidden), (frames > 0).reshape(n, slots)


class OmniModel(OmniGeneration, nn.Module):
    """The omni model; its generation methods (``stream_answer``, ``generate``) are
    :class:`~omnifast.models.generation.OmniGeneration`'s."""

    def __init__(self, config: OmniConfig):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.config = config.validate()
        H = config.hidden
        self.llm = Qwen2ForCausalLM(Qwen2Config(**config.llm))
        vision_config, vision_model = vision_classes(config.vision_type)
        self.vision = vision_model(vision_config(**config.vision))
        self.speech = WhisperEncoder(WhisperConfig(**config.speech))
        vision_width = config.vision["hidden_size"]
        self.image_projector = nn.Sequential(nn.Linear(vision_width, H), nn.GELU(), nn.Linear(H, H))
        self.speech_projector = (
            CTCPosteriorProjector(config.speech_stack, H, compress=config.speech_projector == "ctc_compress")
            if config.speech_projector in ("ctc_posterior", "ctc_compress")
            else SpeechProjector(config.speech["d_model"], config.speech_stack, config.speech_projector_hidden, H)
        )
        decoder_config = config.decoder_config()
        self.speech_decoder = (
            None if decoder_config is None else build_speech_decoder(decoder_config, config.speech_decoder_mode)
        )
        # a CTC head over the LLM's token ids on the speech encoder's frames: pretrains the encoder
        # (``speech-pretrain``) where no pretrained Whisper is at hand; blank is the last class
        self.speech_ctc_head = (
            nn.Linear(config.speech["d_model"], config.llm["vocab_size"] + 1) if config.speech_ctc else None
        )

    # ---- components ----------------------------------------------------------------------------
    def _component(self, name: str) -> nn.Module:
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; components are {', '.join(COMPONENTS)}")
        module = getattr(self, name)
        if module is None:
            raise ValueError(f"this model has no {name}")
        return module

    def freeze(self, except_: Iterable[str] = ()) -> "OmniModel":
        """Freeze every component except those named."""
        keep = set(except_)
        for name in keep:
            self._component(name)
        for name in COMPONENTS:
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(name in keep)
        return self

    def trainable(self, *names: str) -> "OmniModel":
        """Unfreeze the components named (the others keep their state)."""
        for name in names:
            self._component(name).requires_grad_(True)
        return self

    def trainable_components(self) -> List[str]:
        return [
            n
            for n in COMPONENTS
            if getattr(self, n) is not None and any(p.requires_grad for p in getattr(self, n).parameters())
        ]

    # ---- encoders ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, patches, H): the vision tower's ``vision_feature_layer`` (CLIP's CLS
        dropped; SigLIP has none)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (n, 3, H, W), got shape {tuple(pixel_values.shape)}")
        states = self.vision(
            pixel_values.to(self.image_projector[0].weight.dtype), output_hidden_states=True
        ).hidden_states[self.config.vision_feature_layer]
        return self.image_projector(states[:, 1:] if self.config.vision_type == "clip" else states)

    def encode_speech(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel features (n, mel bins, frames) -> (n, speech tokens, H)."""
        if features.dim() != 3 or features.shape[1] != self.config.speech["num_mel_bins"]:
            raise ValueError(
                f"speech_features must be (n, {self.config.speech['num_mel_bins']}, frames), "
                f"got shape {tuple(features.shape)}"
            )
        return self._speech_positions(features)[0]

    def _speech_positions(self, features: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The projected clips and, for ``ctc_compress``, which positions hold a read token."""
        frames = self.speech_frames(features)
        if self.config.speech_projector in ("ctc_posterior", "ctc_compress"):
            embeddings = self.llm.get_input_embeddings().weight
            return self.speech_projector.project(
                self.speech_ctc_head(frames), embeddings[: self.config.llm["vocab_size"]]
            )
        return self.speech_projector(frames), None

    def speech_frames(self, features: torch.Tensor) -> torch.Tensor:
        """The speech encoder's last states (n, positions, d_model) of log-mel features; in
        training, with ``apply_spec_augment`` in the speech config, SpecAugment's time and
        frequency masks first (Whisper's settings: ``mask_time_prob``, ``mask_time_length``, ...)."""
        if self.training and self.config.speech.get("apply_spec_augment"):
            features = spec_augment(features, self.config.speech)
        return self.speech(features.to(self.speech.conv1.weight.dtype)).last_hidden_state

    def embed(self, input_ids: torch.Tensor, pixel_values=None, speech_features=None) -> torch.Tensor:
        """Token embeddings with each placeholder run replaced by the projected features of its
        image / clip, in order."""
        return self.embed_visible(input_ids, pixel_values, speech_features)[0]

    def embed_visible(
        self, input_ids: torch.Tensor, pixel_values=None, speech_features=None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`embed` and which positions the LLM sees: ``visible`` (B, L) bool is False at the
        speech positions a compressing projector (``ctc_compress``) left blank, which the LLM's
        attention skips and which take no position (None where every position is seen)."""
        c = self.config
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        visible = None
        for token_id, inputs, name in (
            (c.image_token_id, pixel_values, "image"),
            (c.speech_token_id, speech_features, "speech"),
        ):
            slots = input_ids == token_id
            count = int(slots.sum())
            given = 0 if inputs is None else inputs.shape[0]
            per_item = c.image_tokens if name == "image" else c.speech_tokens
            if count != given * per_item:
                raise ValueError(
                    f"input_ids hold {count} {name} placeholder positions ({count / per_item:g} "
                    f"{name}s of {per_item}) but {given} {name}s were given"
                )
            if not given:
                continue
            features, read = (self.encode_images(inputs), None) if name == "image" else self._speech_positions(inputs)
            embeds = embeds.masked_scatter(slots[..., None], features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
            if read is not None and not bool(read.all()):
                visible = torch.ones_like(slots).masked_scatter(slots, read.reshape(-1))
        return embeds, visible

    def speech_ctc_loss(
        self,
        speech_features: torch.Tensor,
        labels: torch.Tensor,
        ignore_ids: Iterable[int] = (),
        speech_lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The CTC loss of each clip's transcript (a row of ``labels``: its tokens != -100, the
        ``ignore_ids`` dropped, e.g. the end-of-turn token) on the encoder's frames through
        ``speech_ctc_head``, summed over the clips and divided by their target tokens. One clip
        per row; ``speech_lengths`` (n,): the frames each clip fills (default: the whole window),
        so that the transcript is read where it is said."""
        if self.speech_ctc_head is None:
            raise ValueError("this model has no speech_ctc_head (OmniConfig.speech_ctc=False)")
        from omnifast.ops import ctc_loss_with_logits

        if speech_features is None or speech_features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"speech_ctc_loss takes one clip per row: {labels.shape[0]} rows, "
                f"{0 if speech_features is None else speech_features.shape[0]} clips"
            )
        keep = labels != IGNORE_INDEX
        for token in ignore_ids:
            keep &= labels != token
        logits = self.speech_ctc_head(self.speech_frames(speech_features)).transpose(0, 1)  # (T, B, V + 1)
        target_lengths = keep.sum(1)
        if int(target_lengths.min()) < 1:
            raise ValueError("speech_ctc_loss: a row has no transcript tokens")
        input_lengths = (
            torch.full_like(target_lengths, logits.shape[0])
            if speech_lengths is None
            else speech_lengths.to(target_lengths).clamp(max=logits.shape[0])
        )
        total = ctc_loss_with_logits(
            logits,
            labels[keep],
            input_lengths,
            target_lengths,
            blank=logits.shape[-1] - 1,
            reduction="sum",
            zero_infinity=True,
        )
        return total / target_lengths.sum()

    @torch.no_grad()
    def transcribe_ctc(
        self, speech_features: torch.Tensor, speech_lengths: Optional[torch.Tensor] = None
    ) -> List[List[int]]:
        """Greedy CTC reading of each clip by ``speech_ctc_head`` (over its ``speech_lengths``
        frames): token ids."""
        from omnifast.ops import ctc_greedy_decode

        logits = self.speech_ctc_head(self.speech_frames(speech_features))
        return ctc_greedy_decode(logits, speech_lengths, blank=logits.shape[-1] - 1)

    # ---- training forward --------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        speech_features: Optional[torch.Tensor] = None,
        units: Optional[torch.Tensor] = None,
        unit_lengths: Optional[torch.Tensor] = None,
        text_loss: bool = True,
        lengths: Optional[torch.Tensor] = None,
        **_,
    ) -> OmniOutput:
        """Text loss (next token, labels -100 ignored) and, with target ``units`` (B, U), the
        speech decoder's loss on the LLM's hidden states at the response positions (labels !=
        -100). A frozen LLM runs under no_grad. ``text_loss=False`` skips the text loss.

        Packed: ``input_ids`` and ``labels`` (1, sum lengths) hold the records end to end and
        ``lengths`` (B,) their lengths; each attends within itself, its positions restart, and
        the losses equal those of the padded batch (``hidden_states`` comes back padded)."""
        llm_frozen = not any(p.requires_grad for p in self.llm.parameters()) and not any(
            p.requires_grad
            for m in (self.vision, self.speech, self.image_projector, self.speech_projector)
            for p in m.parameters()
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not llm_frozen):
            embeds, visible = self.embed_visible(input_ids, pixel_values, speech_features)
            if lengths is None:
                hidden = self._run_padded(embeds, attention_mask, visible)
            else:
                if input_ids.shape[0] != 1 or int(lengths.sum()) != input_ids.shape[1]:
                    raise ValueError(
                        f"packed input_ids must be (1, sum of lengths = {int(lengths.sum())}), got "
                        f"{tuple(input_ids.shape)}"
                    )
                # a record's first label is always -100 (its system turn), so no target crosses a boundary
                hidden = self._run_packed(embeds[0], lengths, visible)[None]
            want_text, text_loss = text_loss, None
            if want_text and labels is not None and (labels[:, 1:] != IGNORE_INDEX).any():
                text_loss = linear_cross_entropy(
                    hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                    self.llm.lm_head.weight,
                    self.llm.lm_head.bias,
                    labels[:, 1:].reshape(-1),
                )
        speech_loss = None
        if units is not None:
            if self.speech_decoder is None:
                raise ValueError("units were given but this model has no speech decoder")
            if labels is None:
                raise ValueError("the speech loss needs labels: the response positions are labels != -100")
            if lengths is not None:
                labels = unpack(labels[0] - IGNORE_INDEX, lengths) + IGNORE_INDEX  # padded with IGNORE_INDEX
            hidden = unpack(hidden[0], lengths) if lengths is not None else hidden
            lengths = None  # hidden is padded from here on
            states, tokens, mask = response_states(hidden, labels)
            speech_loss = self.speech_decoder(states, tokens, mask, mask, units, unit_lengths).loss
        losses = [loss for loss in (text_loss, speech_loss) if loss is not None]
        if lengths is not None:
            hidden = unpack(hidden[0], lengths)
        return OmniOutput(sum(losses) if losses else None, text_loss, speech_loss, hidden)

    def _run_padded(self, embeds, attention_mask, visible) -> torch.Tensor:
        """The LLM over a padded batch; positions not ``visible`` are masked from attention and
        take no position, so the others' states are those of the sequence without them (the
        states at the hidden positions themselves are not meaningful)."""
        position_ids = None
        if visible is not None:
            seen = visible if attention_mask is None else visible & attention_mask.bool()
            attention_mask, position_ids = seen.long(), (visible.long().cumsum(1) - 1).clamp(min=0)
        return self.llm.model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def _run_packed(self, embeds, lengths, visible) -> torch.Tensor:
        """The LLM over a pack (sum lengths, H); positions not ``visible`` are dropped from their
        record before it runs, their states left zero."""
        if visible is None:
            return run_packed(self.llm.model, embeds, lengths)
        keep = visible[0]
        kept_lengths = torch.stack([part.sum() for part in keep.split(lengths.tolist())])
        states = run_packed(self.llm.model, embeds[keep], kept_lengths)
        return states.new_zeros(embeds.shape[0], states.shape[-1]).masked_scatter(keep[:, None], states)

    # ---- saving and loading -------------------------------------------------------------------
    def save_pretrained(
        self, path, processor=None, state_dict: Optional[Dict[str, torch.Tensor]] = None, max_shard_size="5GB"
    ) -> None:
        """``omnifast_config.json``, the weights in ``transformers``' layout (one
        ``model.safetensors``, or shards of at most ``max_shard_size`` and their index; see
        ``omnifast/models/weights.py``) and the tokenizer; every file written to a temporary name
        and renamed. ``state_dict``: the whole state to write instead of this module's own (e.g.
        gathered from FSDP shards)."""
        from omnifast.durable import save_durably

        path = Path(path)
        save_weights(self.state_dict() if state_dict is None else state_dict, path, max_shard_size)
        save_durably(path / CONFIG_NAME, self.config.save)
        if processor is not None:
            processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, device=None, allow_nonfinite: bool = False) -> "OmniModel":
        """A folder written by :meth:`save_pretrained`: the model is built on the meta device and
        its weights loaded shard by shard onto ``device`` (default CPU), in the dtype they were
        saved in; every tensor checked (``omnifast/models/safe_load.py``: shape, dtype, finite
        values unless ``allow_nonfinite``), every error naming its file."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path} has no {CONFIG_NAME}: not a directory written by OmniModel.save_pretrained"
            )
        device = torch.device(device or "cpu")
        config = OmniConfig.load(path / CONFIG_NAME)
        weight_files(path)  # a missing shard is found before the model is built
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, path, device, allow_nonfinite)
        rebuild_buffers(model, device)
        return model


def spec_augment(features: torch.Tensor, settings: Dict) -> torch.Tensor:
    """SpecAugment as Whisper's config asks for it: per clip, spans of ``mask_time_length`` frames
    (about ``mask_time_prob`` of them, at least ``mask_time_min_masks``) and of
    ``mask_feature_length`` mel bins (``mask_feature_prob``, ``mask_feature_min_masks``) set to
    zero. (n, bins, frames) -> a masked copy; draws from torch's generator."""
    out = features.clone()
    n, bins, frames = features.shape
    for axis, size, prefix in ((2, frames, "mask_time"), (1, bins, "mask_feature")):
        prob, length = settings.get(f"{prefix}_prob", 0.0), settings.get(f"{prefix}_length", 10)
        least = settings.get(f"{prefix}_min_masks", 0)
        if (prob <= 0 and least <= 0) or length >= size:
            continue
        for row in range(n):
            count = max(least, int(prob * size / length + float(torch.rand(()))))
            for start in torch.randint(0, size - length + 1, (count,)).tolist():
                if axis == 2:
                    out[row, :, start : start + length] = 0
                else:
                    out[row, start : start + length, :] = 0
    return out


def vision_classes(vision_type: str):
    if vision_type == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionConfig, SiglipVisionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionConfig, CLIPVisionModel


def response_states(hidden: torch.Tensor, labels: torch.Tensor):
    """The LLM states and token ids at the response positions (labels != -100) of each row,
    packed left: (B, N, H), (B, N) and the (B, N) mask."""
    keep = labels != IGNORE_INDEX
    counts = keep.sum(1)
    N = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :N]
    states = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    mask = torch.arange(N, device=hidden.device)[None] < counts[:, None]
    tokens = labels.gather(1, order).masked_fill(~mask, 0)
    return states, tokens, mask
