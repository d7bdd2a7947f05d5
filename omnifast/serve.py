"""``omnifast serve``: a web page to talk to a trained omni model. A question is written, recorded
at the microphone or uploaded as audio, optionally about a picture; the answer's text appears token
by token and its speech plays as it is made, with the first-token and first-audio latencies and
the real-time factor under it; a conversation keeps its turns. The page answers through the path
of ``omnifast chat`` (``chat.stream_reply`` over ``OmniModel.stream_answer``).

Safe by default: it listens on 127.0.0.1; uploads are limited in size (``--max-upload-mb``) and
checked as training media are (``training/media.py``: readable, not truncated, speech within the
model's window) before the model sees them, a bad file answered by a message on the page;
requests wait in one queue, answered one at a time. Gradio is an optional extra
(``pip install omnifast[serve]``).

A script calls the page's ``/answer`` endpoint with ``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    chat, speech, stats = client.predict("what colour is the sun", None, None, None, api_name="/answer")
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .chat import encode_question, load_vocoder, speaking_style, stream_reply

AVERAGE_STYLE = "average"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained (or a named size)")
    parser.add_argument("--vocoder", default=None, help="a unit vocoder directory to speak the answers")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="the port (default: 7860)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="the largest upload, in MB")


@dataclass
class Conversation:
    """The turns so far (OpenOmni's records' ``from``/``value``) with the media they name, and the
    messages the page shows for them."""

    turns: List[Dict[str, str]] = field(default_factory=list)
    images: List[np.ndarray] = field(default_factory=list)
    audios: List[np.ndarray] = field(default_factory=list)
    shown: List[Dict[str, str]] = field(default_factory=list)


def style_choices(vocoder) -> List[str]:
    """The styles the page offers: ``label=value`` for each of the vocoder's style labels, or none
    where its units carry the style."""
    if vocoder is None or not vocoder.tokenizer.config.has_style:
        return []
    return [AVERAGE_STYLE] + [f"{name}={value}" for name, values in vocoder.centroids.items() for value in values]


def read_upload(kind: str, path: Optional[str], model, processor, max_bytes: int):
    """An uploaded picture (RGB array) or question (samples at the model's rate), checked as
    training media are; ValueError says what is wrong with it."""
    from omnifast.training.media import audio_problem, image_problem

    if path is None:
        return None
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise ValueError(
            f"the {kind} is {path.stat().st_size / 1e6:.1f} MB; the page takes at most {max_bytes / 1e6:g} MB"
        )
    if kind == "picture":
        from PIL import Image

        problem = image_problem(path)
        if problem is not None:
            raise ValueError(f"the picture cannot be used: {problem.replace(str(path), path.name)}")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    from omnifast.audio import read_audio

    problem = audio_problem(path, float(model.config.audio_seconds), None)
    if problem is not None:
        raise ValueError(f"the spoken question cannot be used: {problem.replace(str(path), path.name)}")
    return read_audio(path, processor.sampling_rate)[0]


def stats_line(reply) -> str:
    token = f"{1000 * reply.first_token_s:.0f} ms" if reply.first_token_s is not None else "-"
    audio = f"{1000 * reply.first_audio_s:.0f} ms" if reply.first_audio_s is not None else "-"
    rtf = f"{reply.rtf:.2f}" if reply.rtf is not None else "-"
    return f"first token {token} · first audio {audio} · real-time factor {rtf} · {len(reply.units)} units"


def build_page(model, processor, vocoder=None, *, max_new_tokens: int = 64, max_upload_mb: float = 10.0):
    """The page (a ``gradio.Blocks``), answering through ``chat.stream_reply``."""
    import gradio as gr

    max_bytes = int(max_upload_mb * 1e6)
    styles = style_choices(vocoder)
    streaming = shutil.which("ffmpeg") is not None  # Gradio encodes streamed audio with it

    def answer(text, audio_path, image_path, style_choice, conversation):
        conversation = conversation or Conversation()
        text = (text or "").strip()
        if not text and audio_path is None:
            raise gr.Error("Ask something: write a question, record one, or upload an audio file.")
        try:
            picture = read_upload("picture", image_path, model, processor, max_bytes)
            speech = read_upload("spoken question", audio_path, model, processor, max_bytes)
            question = ("<image>\n" if picture is not None else "") + ("<speech>" if speech is not None else text)
            turns = conversation.turns + [{"from": "human", "value": question}]
            images = conversation.images + ([picture] if picture is not None else [])
            audios = conversation.audios + ([speech] if speech is not None else [])
            item = encode_question(model, processor, turns, images, audios, max_new_tokens)
            chosen = styles and style_choice in styles and style_choice != AVERAGE_STYLE
            style = speaking_style(vocoder, [style_choice.split("=", 1)] if chosen else []) if vocoder else None
        except ValueError as error:
            raise gr.Error(str(error)) from None
        said = " ".join(
            part
            for part in (
                "[picture]" if picture is not None else "",
                "[spoken question]" if speech is not None else "",
                text if speech is None else "",
            )
            if part
        )
        shown = conversation.shown + [{"role": "user", "content": said}, {"role": "assistant", "content": ""}]
        for kind, value in stream_reply(
            model, processor, item, vocoder=vocoder, style=style, max_new_tokens=max_new_tokens
        ):
            if kind == "text":
                shown[-1] = {"role": "assistant", "content": value}
                yield shown, gr.skip(), gr.skip(), conversation
            elif kind == "audio":
                yield gr.skip(), (vocoder.sampling_rate, value), gr.skip(), conversation
            else:
                shown[-1] = {"role": "assistant", "content": value.text or "(no text)"}
                done = Conversation(turns + [{"from": "gpt", "value": value.text}], images, audios, shown)
                yield shown, gr.skip(), stats_line(value), done

    with gr.Blocks(title="omnifast") as page:
        gr.Markdown(
            "## omnifast: talk to the model\nWrite, record or upload a question; add a picture to ask about it."
        )
        conversation = gr.State(Conversation())
        chat = gr.Chatbot(label="conversation", elem_id="conversation", height=320)
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="question (written)", elem_id="question-text")
                audio = gr.Audio(
                    sources=["upload", "microphone"],
                    type="filepath",
                    label="question (spoken)",
                    elem_id="question-audio",
                )
                image = gr.Image(type="filepath", label="picture", elem_id="picture")
                style = gr.Dropdown(
                    styles or ["the units carry the style"],
                    value=(styles or ["the units carry the style"])[0],
                    label="style of the spoken answer",
                    interactive=bool(styles),
                    elem_id="style",
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="clear")
            with gr.Column():
                speech = gr.Audio(
                    label="spoken answer" if streaming else "spoken answer (whole: streaming needs ffmpeg)",
                    streaming=streaming,
                    autoplay=True,
                    interactive=False,
                    elem_id="answer-audio",
                )
                stats = gr.Markdown(elem_id="stats")
        ask.click(
            answer, [text, audio, image, style, conversation], [chat, speech, stats, conversation], api_name="answer"
        )
        clear.click(lambda: ([], None, "", Conversation()), None, [chat, speech, stats, conversation], api_name=False)
    page.queue(default_concurrency_limit=1, max_size=32)  # one model: one answer at a time, the rest wait
    return page


def serve_command(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("omnifast serve needs Gradio: pip install 'omnifast[serve]'") from None
    from omnifast.training.run import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    if not 0 < args.max_upload_mb <= 1000:
        raise ValueError(f"--max-upload-mb must be in (0, 1000], got {args.max_upload_mb}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.vocoder is not None and not Path(args.vocoder).is_dir():
        raise FileNotFoundError(f"--vocoder {args.vocoder}: no such directory")
    model, processor = load_model(args.model)
    model.eval()
    vocoder = load_vocoder(args.vocoder, [])[0] if args.vocoder else None
    page = build_page(model, processor, vocoder, max_new_tokens=args.max_new_tokens, max_upload_mb=args.max_upload_mb)
    try:
        page.launch(
            server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb", show_error=True
        )
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0
