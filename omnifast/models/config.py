"""``OmniConfig``: the sizes of every component of an omni model, as plain dataclasses that
round-trip through JSON. The component settings are the keyword arguments of the matching
``transformers`` config classes (``Qwen2Config``, ``CLIPVisionConfig``, ``WhisperConfig``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omnifast.durable import write_json
from omnifast.nn.speech_decoder import SpeechDecoderConfig
from omnifast.ops.checks import check_known_keys

IMAGE_TOKEN, SPEECH_TOKEN = "<image>", "<speech>"
# keyword arguments of a transformers config that only say where it came from
_PROVENANCE = ("self", "kwargs", "transformers_version", "architectures")


def component_config_class(name: str, vision_type: str = "clip"):
    import transformers

    if name == "llm":
        return transformers.Qwen2Config
    if name == "speech":
        return transformers.WhisperConfig
    return transformers.SiglipVisionConfig if vision_type == "siglip" else transformers.CLIPVisionConfig


def allowed_component_keys(config_class) -> set:
    """The explicit keyword arguments of a transformers config class: its architecture's settings
    (nothing that names code to load or an attention implementation to fetch)."""
    import inspect

    return set(inspect.signature(config_class.__init__).parameters) - set(_PROVENANCE)


def check_component_keys(name: str, values, config_class) -> None:
    if not isinstance(values, dict):
        raise TypeError(
            f"OmniConfig.{name} must be a dict of {config_class.__name__} settings, got {type(values).__name__}"
        )
    unknown = sorted(set(values) - allowed_component_keys(config_class))
    if unknown:
        raise ValueError(
            f"OmniConfig.{name}: {', '.join(unknown)} are not {config_class.__name__} settings "
            f"omnifast accepts (the architecture's keyword arguments only)"
        )


SPEECH_PROJECTORS = ("concat", "ctc_posterior", "ctc_compress")


@dataclass
class OmniConfig:
    llm: Dict[str, Any]  # Qwen2Config kwargs
    vision: Dict[str, Any]  # CLIPVisionConfig (or SiglipVisionConfig) kwargs
    speech: Dict[str, Any]  # WhisperConfig kwargs (the encoder's are used)
    speech_decoder: Optional[Dict[str, Any]] = None  # SpeechDecoderConfig fields; None: no decoder
    speech_decoder_mode: str = "nar"
    vision_type: str = "clip"  # "clip" or "siglip"
    vision_feature_layer: int = -2  # hidden state taken from the vision tower (CLIP's CLS dropped)
    image_projector: str = "mlp2x_gelu"
    speech_stack: int = 5  # speech projector: concatenate k encoder frames
    speech_projector_hidden: int = 2048
    # "concat": OpenOmni's projector (stacked frames -> MLP); "ctc_posterior": the speech CTC head's
    # posteriors over the LLM's tokens mix the LLM's own token embeddings (speech enters as soft text);
    # "ctc_compress": the same with frames merged by the head's greedy reading (one position per token)
    speech_projector: str = "concat"
    speech_ctc: bool = False  # a CTC head on the speech encoder (the speech-pretrain stage)
    system_prompt: str = "You are a helpful assistant."  # the system turn every conversation starts with
    image_size: int = 336
    sampling_rate: int = 16000
    audio_seconds: int = 30  # the Whisper window every clip is padded to
    image_token_id: int = 151665  # the ids of <image> / <speech> in the tokenizer
    speech_token_id: int = 151666  # (for Qwen2.5: the first two added tokens)
    extra: Dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes -----------------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return self.llm["hidden_size"]

    @property
    def image_tokens(self) -> int:
        """LLM positions per image: the vision tower's patches (CLIP's CLS dropped)."""
        return (self.image_size // self.vision["patch_size"]) ** 2

    @property
    def speech_tokens(self) -> int:
        """LLM positions per clip: encoder frames (half the mel frames) / speech_stack."""
        return self.speech["max_source_positions"] // self.speech_stack

    def decoder_config(self) -> Optional[SpeechDecoderConfig]:
        if self.speech_decoder is None:
            return None
        return SpeechDecoderConfig.from_dict({**self.speech_decoder, "llm_hidden": self.hidden})

    def validate(self) -> "OmniConfig":
        for name in ("llm", "vision", "speech"):
            check_component_keys(name, getattr(self, name), component_config_class(name, self.vision_type))
        if self.speech["max_source_positions"] % self.speech_stack:
            raise ValueError(
                f"speech_stack={self.speech_stack} must divide the speech encoder's "
                f"max_source_positions={self.speech['max_source_positions']}"
            )
        if 2 * self.speech["max_source_positions"] * 160 != self.audio_seconds * self.sampling_rate:
            raise ValueError(
                f"audio_seconds={self.audio_seconds} at {self.sampling_rate} Hz must be the speech "
                f"encoder's window: max_source_positions={self.speech['max_source_positions']} positions "
                f"are {self.speech['max_source_positions'] / 50:g} s of Whisper features (160-sample hop)"
            )
        if (
            self.image_size % self.vision["patch_size"]
            or self.vision.get("image_size", self.image_size) != self.image_size
        ):
            raise ValueError(
                f"image_size={self.image_size} must be the vision tower's and a multiple of its patch size"
            )
        if self.speech_decoder is not None and self.speech_decoder.get("llm_hidden", self.hidden) != self.hidden:
            raise ValueError(
                f"the speech decoder's llm_hidden ({self.speech_decoder['llm_hidden']}) must equal the "
                f"LLM hidden size ({self.hidden})"
            )
        if self.speech_decoder_mode not in ("nar", "ar"):
            raise ValueError(f"speech_decoder_mode must be 'nar' or 'ar', got {self.speech_decoder_mode!r}")
        if not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be text, got {type(self.system_prompt).__name__}")
        if not isinstance(self.speech_ctc, bool):
            raise TypeError(f"speech_ctc must be true or false, got {self.speech_ctc!r}")
        if self.vision_type not in ("clip", "siglip"):
            raise ValueError(f"vision_type must be 'clip' or 'siglip', got {self.vision_type!r}")
        if self.speech_projector not in SPEECH_PROJECTORS:
            choices = ", ".join(map(repr, SPEECH_PROJECTORS))
            raise ValueError(f"speech_projector must be one of {choices}, got {self.speech_projector!r}")
        if self.speech_projector != "concat" and not self.speech_ctc:
            raise ValueError(
                f"speech_projector={self.speech_projector!r} reads the speech CTC head: set speech_ctc=True"
            )
        if self.image_projector != "mlp2x_gelu":
            raise ValueError(f"image_projector must be 'mlp2x_gelu', got {self.image_projector!r}")
        return self

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> "OmniConfig":
        """A few million parameters: every test and the CPU demo use it."""
        return cls(
            llm=_small_llm(
                vocab=320, hidden=128, ffn=256, layers=2, heads=4, kv_heads=2, positions=2048, rope_theta=1e4
            ),
            vision=_small_vision(hidden=64, ffn=128, layers=2, heads=2, image_size=32, patch=8),
            speech=_small_speech(mel_bins=16, width=64, layers=2, heads=2, ffn=128, frames=50),
            speech_decoder=asdict(SpeechDecoderConfig.tiny(llm_hidden=128, text_vocab=320, width=64, intermediate=128)),
            speech_stack=5,
            speech_projector_hidden=128,
            image_size=32,
            audio_seconds=1,
            **_BYTE_TOKENIZER_IDS,
        )

    @classmethod
    def small(cls) -> "OmniConfig":
        """OpenOmni's structure at a size a CPU trains: its decoder at a quarter of its width (24
        layers, 224 wide, 4 experts, 12x upsampling, 6561 units, the 151,936-word text
        embedding), encoders of OpenOmni's token counts (577 image patches, 1500 speech frames) at
        small width, and an LLM (8 layers, 1024 wide) whose forward costs about what the decoder's
        step does, as the 7B LLM's does against OpenOmni's decoder."""
        decoder = SpeechDecoderConfig(
            llm_hidden=1024, width=224, fusion_heads=16, fusion_head_dim=64, heads=14, kv_heads=2, intermediate=1216
        )
        return cls(
            llm=_small_llm(
                vocab=151936, hidden=1024, ffn=4096, layers=8, heads=16, kv_heads=4, positions=4096, rope_theta=1e6
            ),
            vision=_small_vision(hidden=128, ffn=512, layers=2, heads=4, image_size=336, patch=14),
            speech=_small_speech(mel_bins=128, width=128, layers=2, heads=4, ffn=512, frames=1500),
            speech_decoder=asdict(decoder),
            speech_stack=5,
            speech_projector_hidden=256,
            image_size=336,
            audio_seconds=30,
            **_BYTE_TOKENIZER_IDS,
        )

    @classmethod
    def openomni_7b(cls) -> "OmniConfig":
        """OpenOmni: Qwen2.5-7B-Instruct, CLIP-ViT-L/14-336 (layer -2), Whisper-large-v3 encoder
        (128 mel bins), mlp2x_gelu image projector, 5-frame speech projector, its speech decoder
        exactly as it computes (``SpeechDecoderConfig.openomni()``; it cannot stream)."""
        return cls(
            llm=dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            vision=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
                projection_dim=768,
                hidden_act="quick_gelu",
            ),
            speech=dict(
                num_mel_bins=128,
                d_model=1280,
                encoder_layers=32,
                encoder_attention_heads=20,
                encoder_ffn_dim=5120,
                decoder_layers=32,
                decoder_attention_heads=20,
                decoder_ffn_dim=5120,
                max_source_positions=1500,
                vocab_size=51866,
            ),
            speech_decoder=asdict(SpeechDecoderConfig.openomni(llm_hidden=3584)),
            speech_stack=5,
            speech_projector_hidden=2048,
            image_size=336,
            audio_seconds=30,
        )

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "OmniConfig":
        check_known_keys("OmniConfig", values, cls)
        return cls(**values).validate()

    def save(self, path) -> None:
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path) -> "OmniConfig":
        from .safe_load import WeightsError, read_json

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no omnifast config at {path}: not a checkpoint saved by save_pretrained")
        try:
            return cls.from_dict(read_json(path, "omnifast config"))
        except WeightsError:
            raise
        except (TypeError, ValueError) as error:
            raise WeightsError(f"{path}: {error}") from None


# The tiny and small presets: transformers' Qwen2, CLIP and Whisper configs from a few sizes each,
# with the placeholder ids of ``build_tiny_tokenizer``'s byte tokenizer.
_BYTE_TOKENIZER_IDS = dict(image_token_id=259, speech_token_id=260)


def _small_llm(*, vocab, hidden, ffn, layers, heads, kv_heads, positions, rope_theta) -> Dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
    )


def _small_vision(*, hidden, ffn, layers, heads, image_size, patch) -> Dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
    )


def _small_speech(*, mel_bins, width, layers, heads, ffn, frames) -> Dict[str, Any]:
    """A Whisper encoder (its one-layer decoder is never run: transformers builds one)."""
    return dict(
        num_mel_bins=mel_bins,
        d_model=width,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=ffn // 2,
        max_source_positions=frames,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
