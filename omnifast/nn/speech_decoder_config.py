"""The sizes and choices of the speech decoder (``SpeechDecoder``): OpenOmni's by default, the tiny
one of the tests and the CPU demo, and one in proportion to a given LLM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict

from omnifast.ops.checks import check_choice, check_known_keys


@dataclass
class SpeechDecoderConfig:
    """Sizes of the speech decoder. The defaults are OpenOmni's: a Qwen2.5-7B LLM (3584 wide)
    in front, a Qwen2.5-0.5B-sized decoder (24 layers, 896 wide, 14 heads, 2 KV heads), 6561
    units (blank = 6561), 12x upsampling."""

    llm_hidden: int = 3584
    width: int = 896
    units: int = 6561
    upsample_factor: int = 12
    experts: int = 4
    split_tokens: int = 4
    fusion_depth: int = 2
    fusion_heads: int = 16
    fusion_head_dim: int = 256
    fusion_ff_mult: int = 4
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    text_vocab: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 32768
    causal: bool = True  # decoder self-attention; False: bidirectional over the frames
    fusion_causal: bool = True  # text token i sees the LLM states of tokens <= i (False: all, as OpenOmni)
    upsample_rounding: str = "exact"  # "exact": t * n // frames; "openomni": (t / (frames / n)) in float
    loss_normalization: str = "openomni"  # "openomni": sum / total units; "mean": per-sequence mean
    zero_infinity: bool = True

    @classmethod
    def tiny(cls, **overrides) -> "SpeechDecoderConfig":
        """A few hundred thousand parameters: for tests and the CPU demo."""
        sizes = dict(
            llm_hidden=48,
            width=32,
            units=20,
            upsample_factor=3,
            fusion_heads=2,
            fusion_head_dim=16,
            fusion_ff_mult=2,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate=64,
            text_vocab=100,
            max_positions=4096,
        )
        return cls(**{**sizes, **overrides})

    @classmethod
    def openomni(cls, **overrides) -> "SpeechDecoderConfig":
        """Exactly OpenOmni's ``SpeechGeneratorCTC``: its sizes, its text-guided attention over all
        the LLM states, its floating-point upsampling, its loss (sum / total units). It cannot
        stream (a text token attends to states not yet written)."""
        return cls(
            **{
                **dict(
                    fusion_causal=False, upsample_rounding="openomni", loss_normalization="openomni", zero_infinity=True
                ),
                **overrides,
            }
        )

    @classmethod
    def scaled_to(cls, llm_hidden: int, text_vocab: int, **overrides) -> "SpeechDecoderConfig":
        """A decoder in proportion to an LLM of width ``llm_hidden``: OpenOmni's (``openomni()``)
        for a 3584-wide LLM or wider; for a narrower one a quarter of its width (a multiple of 32,
        at least 32), 24 layers scaled by the same ratio (at least 2), and OpenOmni's MLP and
        text-fusion proportions. ``text_vocab``: the LLM's embedding rows (the decoder embeds the
        answer's text tokens)."""
        if llm_hidden >= 3584:
            return cls.openomni(**{**dict(llm_hidden=llm_hidden, text_vocab=text_vocab), **overrides})
        ratio = llm_hidden / 3584
        width = max(32, 32 * round(llm_hidden / 4 / 32))
        head_dim = 64 if width % 64 == 0 else 32
        heads = width // head_dim
        sizes = dict(
            llm_hidden=llm_hidden,
            text_vocab=text_vocab,
            width=width,
            heads=heads,
            kv_heads=2 if heads % 2 == 0 else 1,
            layers=max(2, round(24 * ratio)),
            intermediate=32 * max(1, round(width * 4864 / 896 / 32)),
            fusion_head_dim=max(16, 16 * round(256 * ratio / 16)),
        )
        return cls.openomni(**{**sizes, **overrides})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        check_choice("loss_normalization", self.loss_normalization, ("openomni", "mean"))
        check_choice("upsample_rounding", self.upsample_rounding, ("exact", "openomni"))
        if self.heads % self.kv_heads or self.width % self.heads:
            raise ValueError(
                f"heads ({self.heads}) must divide width ({self.width}) and be a multiple of kv_heads ({self.kv_heads})"
            )

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "SpeechDecoderConfig":
        check_known_keys("speech decoder config", values, cls)
        return cls(**values)

    def qwen2(self):
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.text_vocab,
            hidden_size=self.width,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
