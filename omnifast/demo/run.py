"""``omnifast demo``: build the corpus, train the speech tokenizer, then a tiny OmniModel through
the text warm-up and OpenOmni's five stages, evaluate, and write ``demo_out/report.md``.

The model is ``OmniConfig.tiny()`` grown a little (a 4-layer LLM of width 192, 48-pixel pictures,
3-second clips) with a speech decoder over the tokenizer's units. Every number in the report is
measured by this run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.nn.speech_decoder import SpeechDecoderConfig
from omnifast.audio import read_audio
from omnifast.training.data import load_records
from omnifast.training.stages import LLM_PRETRAIN, STAGES
from omnifast.training.trainer import Trainer, TrainConfig

from . import corpus as demo_corpus

TRAIN_FILES = ("llm-pretrain", "s2t", "i2t-pretrain", "i2t-sft")
EVAL_FILES = ("eval-s2t", "eval-vqa-text", "eval-vqa-speech", "eval-t2s")
LEARNING_RATES = {"llm-pretrain": 2e-3, "s2t": 2e-3, "i2t-pretrain": 2e-3, "i2t-sft": 5e-4, "speech-gen": 2e-3,
                  "emotion-dpo": 2e-4}
# Our Whisper stand-in starts random (OpenOmni's is pretrained), so stage 1 trains it with the projector.
TRAINS = {"s2t": ("speech", "speech_projector")}
SFT_WEIGHT = 1.0  # CTC-DPO alone shortens the tiny decoder's speech to win the margin; the chosen NLL holds it
TOKENIZER_LEVELS = (4, 4, 4, 4)  # 256 units: a codebook the tiny decoder can learn from ~200 sentences


@dataclass(frozen=True)
class DemoSize:
    name: str
    tokenizer_steps: int
    steps: Dict[str, int]                  # optimizer steps per stage
    batch_size: int
    train_limit: Optional[int] = None      # records per training file (None: all)
    eval_limit: Optional[int] = None       # records per evaluation file
    classifier_clips: int = 400            # corpus clips the style classifier learns from
    wavs: int = 3                          # generated answers saved as WAV per kind


FULL = DemoSize("full", 800, {"llm-pretrain": 250, "s2t": 400, "i2t-pretrain": 150, "i2t-sft": 600,
                              "speech-gen": 400, "emotion-dpo": 200}, batch_size=16, classifier_clips=300)
QUICK = DemoSize("quick", 40, {"llm-pretrain": 12, "s2t": 8, "i2t-pretrain": 4, "i2t-sft": 8, "speech-gen": 150,
                               "emotion-dpo": 4}, batch_size=8, train_limit=48, eval_limit=6, classifier_clips=40,
                 wavs=1)


def demo_config(units: int) -> OmniConfig:
    config = OmniConfig.tiny()
    config.llm.update(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2)
    config.vision.update(image_size=48)          # 8-pixel patches: 36 image positions
    config.speech.update(num_mel_bins=40, max_source_positions=150, d_model=128, encoder_layers=3,
                         encoder_attention_heads=4, encoder_ffn_dim=256)  # 3 s: 30 speech positions
    config.image_size, config.audio_seconds, config.speech_projector_hidden = 48, 3, 256
    config.speech_decoder = asdict(SpeechDecoderConfig.tiny(
        llm_hidden=192, text_vocab=320, units=units, upsample_factor=4, width=128, intermediate=256, layers=3,
        fusion_heads=4, fusion_head_dim=32))
    return config.validate()


class Timer:
    """``with timer("stage 1"): ...`` adds the block's wall time to ``timer.seconds["stage 1"]``."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def train_tokenizer(corpus: Path, size: DemoSize, out: Path, seed: int, progress: bool):
    from omnifast.speech import SpeechTokenizer, SpeechTokenizerConfig, UnitVocoder
    from omnifast.speech.train import config_for, evaluate_tokenizer, label_names, load_corpus, split, train_tokenizer as fit
    records = load_corpus(corpus / "tokenizer")
    train, test = split(records, seed=seed)
    torch.manual_seed(seed)
    tokenizer = SpeechTokenizer(config_for(records, SpeechTokenizerConfig.tiny(levels=TOKENIZER_LEVELS)))
    history = fit(tokenizer, train, size.tokenizer_steps, 16, 3e-3, seed, progress)
    names = label_names(records)
    vocoder = UnitVocoder(tokenizer).fit_centroids([r["wave"] for r in train[:400]],
                                                   {n: [str(r[n]) for r in train[:400]] for n in names})
    vocoder.save_pretrained(out)
    probes = evaluate_tokenizer(tokenizer, train[:200], test[:size.eval_limit * 4 if size.eval_limit else None])
    return vocoder, {"history": history, "evaluation": probes}, records


def run_demo(out_dir="demo_out", cache_dir=".cache", quick: bool = False, seed: int = 0,
             progress: bool = True) -> Dict:
    from . import evaluation, report
    size = QUICK if quick else FULL
    out, timer = Path(out_dir), Timer()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with timer("corpus"):
        corpus = demo_corpus.build_corpus(cache_dir, seed, progress=progress)
    with timer("tokenizer"):
        vocoder, tokenizer_report, clips = train_tokenizer(corpus, size, out / "tokenizer", seed, progress)

    def encode(path):
        return vocoder.tokenizer.encode(read_audio(Path(path), vocoder.tokenizer.config.sampling_rate)[0])[0].tolist()

    data = out / "data"
    with timer("units"):
        files = {name: demo_corpus.subset(corpus, name, data, size.train_limit, seed) for name in TRAIN_FILES}
        files.update({name: demo_corpus.subset(corpus, name, data, size.eval_limit, seed) for name in EVAL_FILES})
        for name in ("speech-gen", "emotion-dpo"):
            files[name] = demo_corpus.with_units(corpus, name, encode, data, size.train_limit, seed)
        files["eval-emotion"] = demo_corpus.with_units(corpus, "eval-emotion", encode, data, size.eval_limit, seed)

    config = demo_config(vocoder.tokenizer.config.codebook_size)
    torch.manual_seed(seed)
    model, processor = OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)
    stage_dirs = {}
    for stage in (LLM_PRETRAIN,) + STAGES:
        with timer(f"stage {stage.index}"):
            records = load_records(files[stage.name], stage, config.speech_decoder["units"], media_roots=[corpus],
                                   audio_seconds=config.audio_seconds, sampling_rate=config.sampling_rate)
            options = TrainConfig(stage=stage.name, lr=LEARNING_RATES[stage.name], epochs=10 ** 6,
                                  max_steps=size.steps[stage.name], batch_size=size.batch_size, save_every=10 ** 6,
                                  keep=1, seed=seed, progress=progress, warmup_ratio=0.1,
                                  trains=TRAINS.get(stage.name), sft_weight=SFT_WEIGHT)
            stage_dirs[stage.name] = Trainer(model, processor, records, options,
                                             out / "train" / f"{stage.index}-{stage.name}").train()
    with timer("evaluation"):
        results = evaluation.evaluate_demo(out, files, stage_dirs, vocoder, clips, size, seed, progress, corpus)
    results["tokenizer"] = tokenizer_report["evaluation"]
    results["seconds"] = {**timer.seconds, "total": time.perf_counter() - started}
    results["size"] = size.name
    report.write_report(out, results, stage_dirs)
    return results
