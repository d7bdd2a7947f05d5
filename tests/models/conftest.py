"""The shared component folders of the model tests: a tiny Qwen2 (with a tokenizer lacking the
placeholders), a CLIP vision tower and a Whisper model saved as Hugging Face checkpoints."""

import pytest
import torch

from .test_components import TINY, plain_tokenizer


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        WhisperConfig,
        WhisperModel,
    )

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    tokenizer = plain_tokenizer()
    parts = {
        "llm": Qwen2ForCausalLM(Qwen2Config(**{**TINY.llm, "vocab_size": len(tokenizer)})),
        "vision": CLIPVisionModel(CLIPVisionConfig(**TINY.vision)),
        "speech": WhisperModel(WhisperConfig(**TINY.speech)),
    }
    for name, part in parts.items():
        part.save_pretrained(root / name)
    tokenizer.save_pretrained(root / "llm")
    return root, parts, len(tokenizer)
