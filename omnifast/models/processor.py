"""``OmniProcessor``: conversations with images and audio -> LLM inputs and labels.

ChatML (``<|im_start|>role\\n...<|im_end|>\\n``); each ``<image>`` / ``<speech>`` placeholder in
the text becomes as many placeholder tokens as the LLM positions its features fill (the model
writes the projected features there, in order); labels keep the assistant's text and its
``<|im_end|>`` and mask everything else with -100.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from omnifast.constants import IGNORE_INDEX

from .config import IMAGE_TOKEN, SPEECH_TOKEN, OmniConfig

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, SPEECH_TOKEN]
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(SPEECH_TOKEN)})")


def build_tiny_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + the ChatML and placeholder
    tokens), built with the ``tokenizers`` library: nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def add_placeholder_tokens(tokenizer) -> List[str]:
    """Add the ChatML and ``<image>`` / ``<speech>`` tokens a tokenizer lacks, as special tokens
    (for Qwen2.5's tokenizer: ``<image>`` and ``<speech>`` get ids 151665 and 151666). Returns
    those added; the LLM's embeddings must then cover ``len(tokenizer)``."""
    missing = [t for t in SPECIAL_TOKENS[1:] if _token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def _token_id(tokenizer, token: str) -> Optional[int]:
    found = tokenizer.convert_tokens_to_ids(token)
    return None if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token) else found


class OmniProcessor:
    """Tokenizer + ``CLIPImageProcessor`` + ``WhisperFeatureExtractor`` with explicit settings."""

    def __init__(self, tokenizer, config: OmniConfig, system_prompt: Optional[str] = None):
        from transformers import WhisperFeatureExtractor

        missing = [t for t in SPECIAL_TOKENS[1:] if _token_id(tokenizer, t) is None]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the special tokens {missing}: add them with "
                f"omnifast.models.add_placeholder_tokens(tokenizer) and resize the LLM's embeddings to "
                f"len(tokenizer) (omnifast.models.load_components does both)"
            )
        # the model's own system turn (OmniConfig.system_prompt, saved with it) unless one is given
        self.tokenizer, self.config = tokenizer, config
        self.system_prompt = config.system_prompt if system_prompt is None else system_prompt
        self._image_processor = None  # made on first use: it needs Pillow, which text and speech do not
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=config.speech["num_mel_bins"],
            sampling_rate=config.sampling_rate,
            chunk_length=config.audio_seconds,
        )
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.speech_token_id = tokenizer.convert_tokens_to_ids(SPEECH_TOKEN)
        if (self.image_token_id, self.speech_token_id) != (config.image_token_id, config.speech_token_id):
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN}/{SPEECH_TOKEN} ids ({self.image_token_id}, "
                f"{self.speech_token_id}) differ from the config's ({config.image_token_id}, "
                f"{config.speech_token_id})"
            )

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def image_processor(self):
        """``transformers``' CLIP (or SigLIP) image processor for the config's image size."""
        if self._image_processor is None:
            name, settings = image_settings(self.config)
            import transformers

            cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
            self._image_processor = cls(**settings)
        return self._image_processor

    # ---- media -----------------------------------------------------------------------------
    def images_to_pixels(self, images: Sequence) -> torch.Tensor:
        arrays = []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu().numpy()
            if isinstance(image, np.ndarray):
                if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
                    raise ValueError(
                        f"images[{i}] must be an RGB image (H, W, 3) or (3, H, W), got shape {image.shape}"
                    )
                if image.shape[0] == 3 and image.shape[-1] != 3:
                    image = image.transpose(1, 2, 0)
            arrays.append(image)
        return self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]

    def audio_to_features(self, audios: Sequence, sampling_rate: Optional[int] = None) -> torch.Tensor:
        """Whisper log-mel features of clips sampled at ``sampling_rate`` (default: the model's
        rate): each mixed to mono (the mean of its channels, given as (frames, channels) or
        (channels, frames) with at most 8 channels) and resampled to the model's rate."""
        from omnifast.audio import resample, to_mono

        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"sampling_rate must be a positive integer number of Hz, got {rate!r}")
        waves = []
        for i, audio in enumerate(audios):
            wave = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
            if not np.issubdtype(wave.dtype, np.floating):
                raise ValueError(f"audios[{i}] must hold float samples in [-1, 1], got dtype {wave.dtype}")
            if wave.ndim == 2 and wave.shape[0] <= 8 < wave.shape[1]:
                wave = wave.T  # (channels, frames)
            if wave.ndim not in (1, 2) or (wave.ndim == 2 and wave.shape[1] > 8):
                raise ValueError(
                    f"audios[{i}] must be (frames,) or (frames, channels) with at most 8 channels, "
                    f"got shape {wave.shape}"
                )
            waves.append(resample(to_mono(wave), rate, self.sampling_rate))
        return self.feature_extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt")["input_features"]

    # ---- text --------------------------------------------------------------------------------
    def _ids(self, text: str) -> List[int]:
        ids = []
        for piece in _PLACEHOLDER.split(text):
            if piece == IMAGE_TOKEN:
                ids += [self.image_token_id] * self.config.image_tokens
            elif piece == SPEECH_TOKEN:
                ids += [self.speech_token_id] * self.config.speech_tokens
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def tokenize(self, conversation: Sequence[Dict[str, str]], add_generation_prompt: bool = False):
        """(input_ids, labels) of a conversation as lists, its media placeholders expanded; no
        media is read."""
        turns = [(ROLES.get(t.get("from", t.get("role"))), t.get("value", t.get("content"))) for t in conversation]
        for i, (role, text) in enumerate(turns):
            if role is None or not isinstance(text, str):
                raise ValueError(f"conversation turn {i} needs a known 'from'/'role' and a text 'value'/'content'")
        if turns and turns[0][0] != "system":
            turns = [("system", self.system_prompt)] + turns
        ids, labels = [], []
        for role, content in turns:
            head = self._ids(f"<|im_start|>{role}\n")
            body = self._ids(content) + self._ids("<|im_end|>")
            tail = self._ids("\n")
            ids += head + body + tail
            labels += [IGNORE_INDEX] * len(head) + (body if role == "assistant" else [IGNORE_INDEX] * len(body))
            labels += [IGNORE_INDEX] * len(tail)
        if add_generation_prompt:
            prompt = self._ids("<|im_start|>assistant\n")
            ids, labels = ids + prompt, labels + [IGNORE_INDEX] * len(prompt)
        return ids, labels

    def encode_conversation(
        self,
        conversation: Sequence[Dict[str, str]],
        images: Sequence = (),
        audios: Sequence = (),
        *,
        sampling_rate: Optional[int] = None,
        add_generation_prompt: bool = False,
    ) -> Dict[str, Optional[torch.Tensor]]:
        """One conversation (a list of turns ``{"from": "human"|"gpt", "value": text}`` or
        ``{"role", "content"}``) -> input_ids, labels (S,), pixel_values, speech_features and
        speech_lengths (the encoder positions each clip fills before the window's padding)."""
        ids, labels = self.tokenize(conversation, add_generation_prompt)
        text = "".join(t.get("value", t.get("content")) for t in conversation)
        for token, media, name in ((IMAGE_TOKEN, images, "images"), (SPEECH_TOKEN, audios, "audios")):
            if text.count(token) != len(media):
                raise ValueError(
                    f"the conversation has {text.count(token)} {token} placeholders but {len(media)} {name} were given"
                )
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": self.images_to_pixels(images) if len(images) else None,
            "speech_features": self.audio_to_features(audios, sampling_rate) if len(audios) else None,
            "speech_lengths": self.speech_lengths(audios, sampling_rate) if len(audios) else None,
        }

    def speech_lengths(self, audios: Sequence, sampling_rate: Optional[int] = None) -> torch.Tensor:
        """(n,) the speech encoder's positions (two mel frames each) that each clip fills, at most
        the window's."""
        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        hop = self.feature_extractor.hop_length
        samples = [round(np.asarray(a).shape[0] * self.sampling_rate / rate) for a in audios]
        window = self.config.speech["max_source_positions"]
        return torch.tensor([min(window, -(-(n // hop + 1) // 2)) for n in samples])

    def __call__(
        self,
        conversations: Sequence,
        images: Optional[Sequence] = None,
        audios: Optional[Sequence] = None,
        *,
        sampling_rate: Optional[int] = None,
        add_generation_prompt: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """A right-padded batch: input_ids, labels, attention_mask (B, S); pixel_values of all
        images and speech_features of all clips, in conversation order."""
        images = images or [()] * len(conversations)
        audios = audios or [()] * len(conversations)
        items = [
            self.encode_conversation(c, i, a, sampling_rate=sampling_rate, add_generation_prompt=add_generation_prompt)
            for c, i, a in zip(conversations, images, audios)
        ]
        return collate(items, self.tokenizer.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path, config: OmniConfig) -> "OmniProcessor":
        from transformers import AutoTokenizer

        return cls(
            AutoTokenizer.from_pretrained(str(Path(path)), local_files_only=True, trust_remote_code=False), config
        )


def image_settings(config: OmniConfig):
    """(processor class, its settings): CLIP resizes the short side and centre-crops, SigLIP resizes
    to the square. The PIL implementations, which need no torchvision."""
    size = config.image_size
    if config.vision_type == "siglip":
        return "SiglipImageProcessor", {"size": {"height": size, "width": size}}
    return "CLIPImageProcessor", {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_normalize": True,
    }


def collate(items: Sequence[Dict[str, Optional[torch.Tensor]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Pad encoded conversations to one batch."""
    length = max(item["input_ids"].numel() for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
    }
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        batch["input_ids"][row, :n] = item["input_ids"]
        batch["labels"][row, :n] = item["labels"]
        batch["attention_mask"][row, :n] = 1
    for key in ("pixel_values", "speech_features", "speech_lengths"):
        present = [item[key] for item in items if item.get(key) is not None]
        batch[key] = torch.cat(present) if present else None
    return batch
