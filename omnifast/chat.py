"""``omnifast chat``: ask a trained model a question, written (``--text``) or spoken (``--wav``),
about an optional picture (``--image``); the answer is printed and its speech written as a WAV
file. ``--stream`` prints each text token as it is chosen and appends each chunk of speech to the
WAV file as its units are made, then reports the first-token and first-audio latencies."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
    vocoder = None
    if args.vocoder:
        from omnifast.speech import UnitVocoder

        vocoder = UnitVocoder.from_pretrained(args.vocoder)
    images = [np.asarray(Image.open(args.image).convert("RGB"))] if args.image else []
    audios = [read_audio(args.wav, processor.sampling_rate)[0]] if args.wav else []
    if audios and len(audios[0]) > model.config.audio_seconds * processor.sampling_rate:
        raise ValueError(
            f"--wav {args.wav}: {len(audios[0]) / processor.sampling_rate:.1f} s is longer than the "
            f"model's {model.config.audio_seconds} s speech window"
        )
    question = ("<image>\n" if images else "") + ("<speech>" if audios else args.text)
    item = processor.encode_conversation(
        [{"from": "human", "value": question}], images, audios, add_generation_prompt=True
    )
    positions = model.config.llm.get("max_position_embeddings")
    if positions is not None and item["input_ids"].numel() + args.max_new_tokens > positions:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens}: the question takes {item['input_ids'].numel()} of "
            f"the model's {positions} positions, so at most {positions - item['input_ids'].numel()} "
            f"tokens can follow"
        )
    speak = model.speech_decoder is not None
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, units, first_token, first_audio, printed = [], [], None, None, ""
    style = None
    if vocoder is not None and vocoder.tokenizer.config.has_style:
        style = vocoder.style_for(**dict(labels)) if labels else vocoder.average_style()
    elif labels:
        raise ValueError("--style: this vocoder speaks from units alone (its units carry the style)")
    writer = (
        soundfile.SoundFile(args.out, "w", samplerate=vocoder.sampling_rate, channels=1, subtype="FLOAT")
        if vocoder is not None and speak
        else None
    )
    start = time.perf_counter()
    for event in model.stream_answer(
        item["input_ids"],
        item["pixel_values"],
        item["speech_features"],
        max_new_tokens=args.max_new_tokens,
        eos_token_id=eos,
        speak=speak,
    ):
        if event.kind == "token":
            tokens.append(event.token)
            first_token = event.seconds if first_token is None else first_token
            if args.stream:
                text = processor.decode(tokens)
                print(text[len(printed) :], end="", flush=True)
                printed = text
        else:
            units += event.units
            if writer is not None and args.stream:
                writer.write(vocoder.synthesize(event.units, style)[0])
                first_audio = time.perf_counter() - start if first_audio is None else first_audio
    if writer is not None and not args.stream:
        writer.write(vocoder.synthesize(units, style)[0])
    if writer is not None:
        writer.close()
    text = processor.decode(tokens)
    print(text[len(printed) :] if args.stream else text)
    if writer is not None:
        print(f"speech: {args.out} ({len(units)} units)")
    elif speak:
        print(f"units ({len(units)}): {' '.join(map(str, units))}" if units else "no units were made")
    else:
        print("this model has no speech decoder: text only")
    if args.stream and speak and not model.streams_speech:
        print(
            "this model's speech decoder does not stream (AR, or OpenOmni's fusion over the whole text): its "
            "units came after the text",
            file=sys.stderr,
        )
    if args.stream:
        audio = f", first audio after {1000 * first_audio:.0f} ms" if first_audio is not None else ""
        token = f"{1000 * first_token:.0f} ms" if first_token is not None else "-"
        print(f"first token after {token}{audio}", file=sys.stderr)
    return 0


def _label(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"--style takes LABEL=VALUE (e.g. emotion=happy), got {text!r}")
    return name, value
