"""``build_speech_decoder(config, mode)``: the speech decoder a mode names, ``"nar"`` (CTC,
streaming: :class:`~omnifast.nn.ctc_decoder.CTCSpeechDecoder`) or ``"ar"`` (next unit:
:class:`~omnifast.nn.ar_decoder.ARSpeechDecoder`)."""

from __future__ import annotations

from typing import Optional

from omnifast.ops.checks import check_choice

from .ar_decoder import ARSpeechDecoder
from .ctc_decoder import CTCSpeechDecoder
from .speech_decoder import SpeechDecoder
from .speech_decoder_config import SpeechDecoderConfig

DECODERS = {"nar": CTCSpeechDecoder, "ar": ARSpeechDecoder}


def build_speech_decoder(
    config: SpeechDecoderConfig, mode: str = "nar", backend: Optional[str] = None
) -> SpeechDecoder:
    check_choice("mode", mode, tuple(DECODERS))
    return DECODERS[mode](config, backend=backend)
