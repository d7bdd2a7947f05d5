"""An omni model assembled from local Hugging Face checkpoint folders (an LLM with its tokenizer,
a vision tower, a Whisper encoder) and optionally a speech decoder saved on its own; and that
decoder's own save and load."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from omnifast.durable import write_json
from omnifast.nn import build_speech_decoder
from omnifast.nn.speech_decoder import SpeechDecoder

from .config import IMAGE_TOKEN, SPEECH_PROJECTORS, SPEECH_TOKEN, OmniConfig
from .omni import CTCPosteriorProjector, OmniModel, vision_classes

MODEL_TYPES = {
    "llm": ("qwen2",),
    "vision": ("clip", "clip_vision_model", "siglip", "siglip_vision_model"),
    "speech": ("whisper",),
}


def load_components(
    llm,
    vision,
    speech,
    decoder=None,
    config: Optional[OmniConfig] = None,
    tokenizer=None,
    strict: bool = True,
    allow_nonfinite: bool = False,
    **overrides,
):
    """An omni model and its processor from local Hugging Face checkpoint directories
    (``Qwen2ForCausalLM`` with its tokenizer, a CLIP or SigLIP vision tower or whole model,
    ``WhisperModel``) and optionally a speech decoder saved by :func:`save_speech_decoder`; the
    projectors start fresh. Nothing is downloaded.

    The architectures, the image size and the audio window are the components'. The tokenizer
    (the LLM folder's, or ``tokenizer``: a tokenizer or a folder) gets the ``<image>`` /
    ``<speech>`` placeholders and ChatML tokens it lacks, the LLM's embeddings grow to cover
    them, and the config takes their ids. Every other setting comes from ``config`` when one is
    given (its speech decoder too, at the LLM's width), else from the components: the speech
    projector min(2048, LLM width) wide, the decoder ``SpeechDecoderConfig.scaled_to`` the LLM.
    ``overrides`` set OmniConfig fields last.

    Each folder must hold the architecture its argument names (a CLIP folder passed as
    ``speech=`` is refused by name); a weight transformers reports missing (initialised fresh) or
    unexpected is an error naming it unless ``strict=False`` (a vision tower read from a whole
    CLIP model leaves the text tower's weights unused, which is fine); weights with NaN or
    infinite values are refused unless ``allow_nonfinite``."""
    import dataclasses

    from transformers import Qwen2ForCausalLM, WhisperModel

    from omnifast.nn.speech_decoder import SpeechDecoderConfig

    from .processor import OmniProcessor, add_placeholder_tokens

    dirs = {"llm": llm, "vision": vision, "speech": speech}
    for name, directory in dirs.items():
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"{name}={directory} has no config.json: not a Hugging Face checkpoint directory")
    if config is not None and not isinstance(config, OmniConfig):
        raise TypeError(f"config must be an OmniConfig, got {type(config).__name__}")
    llm_config = _checked_config("llm", llm)
    vision_config = _checked_config("vision", vision)
    speech_config = _checked_config("speech", speech)
    tokenizer = _component_tokenizer(llm if tokenizer is None else tokenizer)
    add_placeholder_tokens(tokenizer)
    vision_type = "siglip" if "siglip" in vision_config.model_type else "clip"
    vision_config = getattr(vision_config, "vision_config", vision_config)
    sampling_rate, window = _audio_window(speech, speech_config)
    rows = max(llm_config.vocab_size, len(tokenizer))
    fixed = dict(
        llm={**_config_kwargs(llm_config), "vocab_size": rows},
        vision=_config_kwargs(vision_config),
        speech=_config_kwargs(speech_config),
        image_size=vision_config.image_size,
        vision_type=vision_type,
        sampling_rate=sampling_rate,
        audio_seconds=window,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        speech_token_id=tokenizer.convert_tokens_to_ids(SPEECH_TOKEN),
    )
    hidden = llm_config.hidden_size
    decoder_model = load_speech_decoder(decoder) if decoder is not None else None
    if decoder_model is not None:
        decoder_dict = decoder_model.config.to_dict()
        fixed["speech_decoder_mode"] = decoder_model.mode
    elif config is not None:
        decoder_dict = None if config.speech_decoder is None else {**config.speech_decoder, "llm_hidden": hidden}
    else:
        decoder_dict = dataclasses.asdict(SpeechDecoderConfig.scaled_to(hidden, rows))
    chosen = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name in ("image_size", "audio_seconds", "sampling_rate"):
        wanted = overrides.get(name, chosen.get(name))
        if wanted is not None and wanted != fixed[name]:
            raise ValueError(f"{name}={wanted} was asked for, but the components fix it at {fixed[name]}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    combined = OmniConfig(
        **{
            **dict(speech_projector_hidden=min(2048, hidden)),
            **chosen,
            **fixed,
            "speech_decoder": decoder_dict,
            **overrides,
        }
    ).validate()
    if decoder_dict is not None and decoder_dict["llm_hidden"] != hidden:
        raise ValueError(
            f"the speech decoder takes LLM states of width {decoder_dict['llm_hidden']} but the "
            f"LLM's hidden size is {hidden}"
        )
    if decoder_dict is not None and decoder_dict["text_vocab"] < len(tokenizer):
        raise ValueError(
            f"the speech decoder embeds {decoder_dict['text_vocab']} text tokens but the tokenizer has {len(tokenizer)}"
        )
    with torch.device("meta"):
        model = OmniModel(combined)
    model.llm = _load_hf(Qwen2ForCausalLM, "llm", llm, strict, allow_nonfinite)
    if model.llm.get_input_embeddings().num_embeddings < rows:
        model.llm.resize_token_embeddings(rows)
    model.vision = _load_hf(
        vision_classes(vision_type)[1], "vision", vision, strict, allow_nonfinite, unexpected_ok=True
    )
    model.speech = _load_hf(WhisperModel, "speech", speech, strict, allow_nonfinite, unexpected_ok=True).get_encoder()
    model.image_projector = model.image_projector.to_empty(device="cpu")
    model.speech_projector = model.speech_projector.to_empty(device="cpu")
    if model.speech_ctc_head is not None:
        model.speech_ctc_head = model.speech_ctc_head.to_empty(device="cpu")
    for module in (model.image_projector, model.speech_projector, model.speech_ctc_head or nn.Identity()):
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, CTCPosteriorProjector)):
                layer.reset_parameters()
    model.speech_decoder = (
        decoder_model
        if decoder_model is not None
        else (
            None
            if combined.speech_decoder is None
            else build_speech_decoder(combined.decoder_config(), combined.speech_decoder_mode)
        )
    )
    return model, OmniProcessor(tokenizer, combined)


def _checked_config(name: str, folder):
    """A component folder's config, of the architecture ``name`` takes."""
    from transformers import AutoConfig

    from .safe_load import WeightsError, read_json

    model_type = read_json(Path(folder) / "config.json", "model config").get("model_type")
    if model_type not in MODEL_TYPES[name]:
        raise WeightsError(
            f"{name}={folder} holds a {model_type!r} model (its config.json's model_type); {name} takes "
            f"{' or '.join(MODEL_TYPES[name])}"
        )
    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _load_hf(cls, name: str, folder, strict: bool, allow_nonfinite: bool, unexpected_ok: bool = False):
    """``cls.from_pretrained`` of a local folder, what transformers reports missing (or, unless
    ``unexpected_ok``, unexpected) refused by name when ``strict``; the weights checked finite."""
    from .safe_load import WeightsError, check_finite

    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = [
        f"{kind.replace('_', ' ')}: {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
        for kind in ("missing_keys", "mismatched_keys") + (() if unexpected_ok else ("unexpected_keys",))
        for keys in [list(info.get(kind) or [])]
        if keys
    ]
    if problems and strict:
        raise WeightsError(
            f"{name}={folder}: the weights do not fit {cls.__name__} ({'; '.join(problems)}); "
            f"strict=False loads it anyway, the missing ones freshly initialised"
        )
    check_finite(model, f"{name}={folder}", allow_nonfinite)
    return model


def _component_tokenizer(source):
    """A tokenizer object as it is, or the one saved in a folder."""
    from transformers import AutoTokenizer

    if not isinstance(source, (str, Path)):
        return source
    folder = Path(source)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(f"{folder} holds no tokenizer: save the LLM's tokenizer there, or pass tokenizer=")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def _audio_window(speech, speech_config):
    """(sampling rate, seconds) of the Whisper encoder's input window: its positions are half the
    mel frames, a frame every ``hop_length`` samples (the folder's feature extractor settings,
    else Whisper's 16 kHz and 160)."""
    import json

    settings = {}
    preprocessor = Path(speech) / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
    rate, hop = int(settings.get("sampling_rate", 16000)), int(settings.get("hop_length", 160))
    samples = 2 * speech_config.max_source_positions * hop
    if samples % rate:
        raise ValueError(
            f"speech={speech}: its window of {samples} samples at {rate} Hz is not a whole number of seconds"
        )
    return rate, samples // rate


def _config_kwargs(config) -> Dict:
    """A local component's config as OmniConfig settings: its architecture's keyword arguments
    only (an ``auto_map``, an attention implementation or anything else is left behind)."""
    from .config import allowed_component_keys

    allowed = allowed_component_keys(type(config)) - {"dtype", "id2label", "label2id"}
    return {k: v for k, v in config.to_dict().items() if k in allowed}


def save_speech_decoder(decoder: SpeechDecoder, path) -> None:
    """A speech decoder alone: ``speech_decoder.json`` (config and mode) + safetensors."""

    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(decoder, str(path / "speech_decoder.safetensors"))
    write_json(path / "speech_decoder.json", {"mode": decoder.mode, "config": decoder.config.to_dict()})


def load_speech_decoder(path) -> SpeechDecoder:
    from omnifast.nn.speech_decoder import SpeechDecoderConfig

    from .safe_load import WeightsError, check_tensors, read_json, read_safetensors

    path = Path(path)
    if not (path / "speech_decoder.json").is_file():
        raise FileNotFoundError(f"{path} has no speech_decoder.json: not a directory written by save_speech_decoder")
    meta = read_json(path / "speech_decoder.json", "speech decoder settings")
    try:
        decoder = build_speech_decoder(SpeechDecoderConfig.from_dict(meta["config"]), meta["mode"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path / 'speech_decoder.json'}: {error}") from None
    weights = path / "speech_decoder.safetensors"
    tensors = read_safetensors(weights)
    expected = decoder.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"{weights}: does not hold this decoder's tensors (missing: {missing[:5]}; unexpected: {extra[:5]})"
        )
    decoder.load_state_dict(check_tensors(tensors, expected, weights))
    return decoder


def add_init_arguments(parser) -> None:
    parser.add_argument("--llm", required=True, help="a Qwen2 (Qwen2.5) checkpoint folder with its tokenizer")
    parser.add_argument("--vision", required=True, help="a CLIP or SigLIP vision tower (or whole model) folder")
    parser.add_argument("--speech", required=True, help="a Whisper checkpoint folder (its encoder is used)")
    parser.add_argument(
        "--decoder",
        default=None,
        help="a speech decoder folder (save_speech_decoder); default: a "
        "fresh one in proportion to the LLM (OpenOmni's for a 7B)",
    )
    parser.add_argument(
        "--units",
        type=int,
        default=6561,
        help="the fresh speech decoder's unit vocabulary (OpenOmni's NAR units: 6561; AR: 16384)",
    )
    parser.add_argument(
        "--mode",
        choices=("nar", "ar"),
        default="nar",
        help="the fresh speech decoder: nar (CTC, streams) or ar (next unit)",
    )
    parser.add_argument(
        "--speech-ctc", action="store_true", help="add a CTC head on the speech encoder (for the speech-pretrain stage)"
    )
    parser.add_argument(
        "--speech-projector",
        choices=SPEECH_PROJECTORS,
        default="concat",
        help="concat: OpenOmni's (stacked frames through an MLP); ctc_posterior: the CTC head's posteriors "
        "over the LLM's tokens weigh its token embeddings; ctc_compress: the same, one position per token the "
        "head reads (both add the CTC head; pretrain it first)",
    )
    parser.add_argument("--out", required=True, help="where the model is saved (omnifast train --model OUT)")


def init_command(args) -> int:
    """``omnifast init``: an omni model from a user's own component folders, saved for
    ``omnifast train --model``; the projectors (and a fresh decoder) start random."""
    import sys
    from dataclasses import replace

    if args.units < 1:
        raise ValueError(f"--units must be an integer >= 1, got {args.units}")
    if args.decoder is not None and (args.units != 6561 or args.mode != "nar"):
        raise ValueError("--units and --mode describe a fresh decoder: a --decoder folder brings its own")
    model, processor = load_components(
        args.llm,
        args.vision,
        args.speech,
        args.decoder,
        speech_decoder_mode=args.mode if args.decoder is None else None,
        speech_ctc=args.speech_ctc or args.speech_projector != "concat",
        speech_projector=args.speech_projector,
    )
    if args.decoder is None and model.config.speech_decoder["units"] != args.units:
        model.config.speech_decoder = {**model.config.speech_decoder, "units": args.units}
        model.speech_decoder = build_speech_decoder(replace(model.config.decoder_config()), args.mode)
    model.save_pretrained(args.out, processor)
    c = model.config
    print(
        f"saved to {args.out}: LLM {c.llm['num_hidden_layers']} layers x {c.hidden}, {c.image_tokens} image "
        f"positions ({c.image_size} px), {c.speech_tokens} speech positions ({c.audio_seconds} s at "
        f"{c.sampling_rate} Hz), speech decoder {model.speech_decoder.mode} over {c.speech_decoder['units']} units",
        file=sys.stderr,
    )
    return 0
