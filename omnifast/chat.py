"""``omnifast chat``: ask a trained model a question, written (``--text``) or spoken (``--wav``),
about an optional picture (``--image``); the answer is printed and its speech written as a WAV
file. ``--stream`` prints each text token as it is chosen and appends each chunk of speech to the
WAV file as its units are made, then reports the first-token and first-audio latencies."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained (or a named size)")
    question = parser.add_mutually_exclusive_group(required=True)
    question.add_argument("--text", help="the question, written")
    question.add_argument("--wav", help="the question, spoken: an audio file (any rate, any format soundfile reads)")
    parser.add_argument("--image", default=None, help="a picture the question is about")
    parser.add_argument(
        "--vocoder",
        default=None,
        help="a unit vocoder directory (UnitVocoder.save_pretrained) to "
        "speak the answer; without one the units are printed",
    )
    parser.add_argument(
        "--style",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="the voice, by the vocoder's style labels (e.g. emotion=happy; repeatable; default: "
        "the average of its styles)",
    )
    parser.add_argument("--out", default=None, help="the spoken answer, with --vocoder (default: answer.wav)")
    parser.add_argument("--stream", action="store_true", help="print tokens and write audio as they are made")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="the longest answer, in tokens (at most the model's positions left after the question)",
    )


@dataclass
class Reply:
    """What an answer took: its text and units, the first-token and first-audio latencies, and
    the real-time factor (seconds spent / seconds of speech made; below 1 is faster than real time)."""

    text: str = ""
    units: List[int] = field(default_factory=list)
    first_token_s: Optional[float] = None
    first_audio_s: Optional[float] = None
    seconds: float = 0.0
    audio_seconds: float = 0.0

    @property
    def rtf(self) -> Optional[float]:
        return self.seconds / self.audio_seconds if self.audio_seconds > 0 else None


def encode_question(
    model, processor, turns, images, audios, max_new_tokens: int, speech_name: str = "the spoken question"
) -> dict:
    """The prompt of a conversation whose last turn is the user's question, checked: every speech
    clip (``speech_name`` in a message) within the model's window, and room for ``max_new_tokens``
    in its positions."""
    window = model.config.audio_seconds * processor.sampling_rate
    for samples in audios:
        if len(samples) > window:
            raise ValueError(
                f"{speech_name}: {len(samples) / processor.sampling_rate:.1f} s is longer than the "
                f"model's {model.config.audio_seconds} s speech window"
            )
    item = processor.encode_conversation(turns, images, audios, add_generation_prompt=True)
    positions = model.config.llm.get("max_position_embeddings")
    if positions is not None and item["input_ids"].numel() + max_new_tokens > positions:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: the question{' with the turns before it' if len(turns) > 1 else ''} "
            f"takes {item['input_ids'].numel()} of "
            f"the model's {positions} positions, so at most {positions - item['input_ids'].numel()} "
            f"tokens can follow"
        )
    return item


def stream_reply(
    model, processor, item, *, vocoder=None, style=None, max_new_tokens: int = 64, stream_audio: bool = True
) -> Iterator[Tuple[str, object]]:
    """The answer to an encoded question (``encode_question``) through ``OmniModel.stream_answer``,
    as it is made: ``("text", answer so far)`` after each token; with a vocoder and
    ``stream_audio``, ``("audio", samples)`` for each chunk of speech as its units are made; last,
    ``("done", Reply)``. ``omnifast chat`` and ``omnifast serve`` both answer through it."""
    speak = model.speech_decoder is not None
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply, tokens = Reply(), []
    start = time.perf_counter()
    for event in model.stream_answer(
        item["input_ids"],
        item["pixel_values"],
        item["speech_features"],
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        speak=speak,
    ):
        if event.kind == "token":
            tokens.append(event.token)
            reply.first_token_s = event.seconds if reply.first_token_s is None else reply.first_token_s
            reply.text = processor.decode(tokens)
            yield "text", reply.text
        else:
            reply.units += event.units
            if vocoder is not None and stream_audio and event.units:
                samples = vocoder.synthesize(event.units, style)[0]
                if reply.first_audio_s is None:
                    reply.first_audio_s = time.perf_counter() - start
                reply.audio_seconds += len(samples) / vocoder.sampling_rate
                yield "audio", samples
    reply.seconds = time.perf_counter() - start
    reply.text = processor.decode(tokens)
    yield "done", reply


def load_vocoder(path, labels):
    """A unit vocoder and the style it speaks in (``labels``: the vocoder's style labels; none:
    the average of its styles; a units-only vocoder takes none)."""
    from omnifast.speech import UnitVocoder

    vocoder = UnitVocoder.from_pretrained(path)
    return vocoder, speaking_style(vocoder, labels)


def speaking_style(vocoder, labels):
    """The style vector for ``labels`` (pairs of the vocoder's style label and value; none: the
    average of its styles), or None for a vocoder whose units carry the style."""
    if vocoder.tokenizer.config.has_style:
        return vocoder.style_for(**dict(labels)) if labels else vocoder.average_style()
    if labels:
        raise ValueError("--style: this vocoder speaks from units alone (its units carry the style)")
    return None


def chat_command(args) -> int:
    import numpy as np
    import soundfile
    from PIL import Image

    from omnifast.audio import read_audio
    from omnifast.training.run import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    if args.out is not None and args.vocoder is None:
        raise ValueError("--out writes the spoken answer, which needs --vocoder (without one the units are printed)")
    args.out = args.out or "answer.wav"
    for name in ("wav", "image", "vocoder"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name} {value}: no such file or directory")
    labels = [_label(text) for text in args.style]  # a malformed --style is refused before the model loads
    model, processor = load_model(args.model)
    model.eval()
    vocoder, style = load_vocoder(args.vocoder, labels) if args.vocoder else (None, None)
    images = [np.asarray(Image.open(args.image).convert("RGB"))] if args.image else []
    audios = [read_audio(args.wav, processor.sampling_rate)[0]] if args.wav else []
    question = ("<image>\n" if images else "") + ("<speech>" if audios else args.text)
    turns = [{"from": "human", "value": question}]
    item = encode_question(model, processor, turns, images, audios, args.max_new_tokens, f"--wav {args.wav}")
    speak = model.speech_decoder is not None
    writer = (
        soundfile.SoundFile(args.out, "w", samplerate=vocoder.sampling_rate, channels=1, subtype="FLOAT")
        if vocoder is not None and speak
        else None
    )
    printed, reply = "", None
    for kind, value in stream_reply(
        model,
        processor,
        item,
        vocoder=vocoder,
        style=style,
        max_new_tokens=args.max_new_tokens,
        stream_audio=args.stream,
    ):
        if kind == "text" and args.stream:
            print(value[len(printed) :], end="", flush=True)
            printed = value
        elif kind == "audio" and writer is not None:
            writer.write(value)
        elif kind == "done":
            reply = value
    if writer is not None and not args.stream:
        writer.write(vocoder.synthesize(reply.units, style)[0])
    if writer is not None:
        writer.close()
    print(reply.text[len(printed) :] if args.stream else reply.text)
    if writer is not None:
        print(f"speech: {args.out} ({len(reply.units)} units)")
    elif speak:
        print(f"units ({len(reply.units)}): {' '.join(map(str, reply.units))}" if reply.units else "no units were made")
    else:
        print("this model has no speech decoder: text only")
    if args.stream and speak and not model.streams_speech:
        print(
            "this model's speech decoder does not stream (AR, or OpenOmni's fusion over the whole text): its "
            "units came after the text",
            file=sys.stderr,
        )
    if args.stream:
        audio = f", first audio after {1000 * reply.first_audio_s:.0f} ms" if reply.first_audio_s is not None else ""
        token = f"{1000 * reply.first_token_s:.0f} ms" if reply.first_token_s is not None else "-"
        print(f"first token after {token}{audio}", file=sys.stderr)
    return 0


def _label(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"--style takes LABEL=VALUE (e.g. emotion=happy), got {text!r}")
    return name, value
