"""``omnifast demo``: build the corpus, train the speech tokenizer (units alone: OpenOmni's mode),
the judges (an intelligibility judge and a style classifier, trained for judging only), then a
tiny OmniModel through the stand-ins of pretraining (its LLM reads the language, its speech
encoder learns to hear it) and OpenOmni's five stages, all through omnifast's ``Trainer``;
evaluate on held-out records and write ``demo_out/report.md``.

The model is ``OmniConfig.tiny()`` grown a little (a 4-layer LLM of width 192, 48-pixel pictures,
3-second clips, a CTC head on its speech encoder whose reading of the LLM's tokens carries the
speech into the LLM: ``speech_projector="ctc_compress"``) with a speech decoder over the
tokenizer's units. Every number in the report is measured by this run.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from omnifast.audio import read_audio
from omnifast.models import OmniConfig, OmniModel, OmniProcessor, build_tiny_tokenizer
from omnifast.nn.speech_decoder import SpeechDecoderConfig
from omnifast.training.data import load_records
from omnifast.training.stages import PRETRAINING, STAGES
from omnifast.training.trainer import TrainConfig, Trainer

from . import corpus as demo_corpus
from .speech import STYLES

TRAIN_FILES = ("llm-pretrain", "speech-pretrain", "s2t", "i2t-pretrain", "i2t-sft")
EVAL_FILES = ("eval-s2t", "eval-s2t-train-voices", "eval-vqa-text", "eval-vqa-speech", "eval-vqa-caption-speech")
LEARNING_RATES = {
    "llm-pretrain": 2e-3,
    "speech-pretrain": 2e-3,
    "s2t": 3e-3,
    "i2t-pretrain": 2e-3,
    "i2t-sft": 5e-4,
    "speech-gen": 3e-3,
    "emotion-dpo": 2e-3,
}
# Stage 1 trains the tiny LLM stand-in, at a tenth of the stage's rate, to write down the speech
# its CTC head reads (OpenOmni's 7B LLM stays frozen); the compressing projector's one parameter,
# the blank, is never seen by the LLM, so the LLM is what learns.
TRAINS = {"s2t": ("speech_projector", "llm")}
COMPONENT_LR = {"s2t": {"llm": 3e-4}}
SFT_WEIGHT = 1.0  # CTC-DPO alone shortens the tiny decoder's speech to win the margin; the chosen NLL holds it
DPO_BETA = 0.5  # a stiffer tie to the stage-4 decoder than TRL's 0.1: 200 steps reach the asked emotion
TOKENIZER_LEVELS = (4, 4, 4, 4)  # 256 units: a codebook the tiny decoder can learn from a few hundred sentences
TOKENIZER_CTC_WEIGHT = 0.5  # units alone carry content and prosody: a lighter content loss leaves them unintelligible


@dataclass(frozen=True)
class DemoSize:
    name: str
    tokenizer_steps: int
    judge_steps: int
    steps: Dict[str, int]  # optimizer steps per stage
    batch_size: int
    batch_sizes: Dict[str, int] = field(default_factory=dict)  # per stage, where not batch_size
    train_limit: Optional[int] = None  # records per training file (None: all)
    eval_limit: Optional[int] = None  # records per evaluation file
    judge_clips: int = 1200  # real clips of the pretraining voices the judge hears
    wavs: int = 3  # generated answers saved as WAV per kind


FULL = DemoSize(
    "full",
    800,
    600,
    {
        "llm-pretrain": 400,
        "speech-pretrain": 1000,
        "s2t": 250,
        "i2t-pretrain": 150,
        "i2t-sft": 500,
        "speech-gen": 1000,
        "emotion-dpo": 200,
    },
    batch_size=16,
    batch_sizes={"speech-pretrain": 32},
)
QUICK = DemoSize(
    "quick",
    150,
    20,
    {
        "llm-pretrain": 12,
        "speech-pretrain": 8,
        "s2t": 8,
        "i2t-pretrain": 4,
        "i2t-sft": 8,
        "speech-gen": 150,
        "emotion-dpo": 4,
    },
    batch_size=8,
    train_limit=48,
    eval_limit=6,
    judge_clips=48,
    wavs=1,
)


def demo_config(units: int) -> OmniConfig:
    config = OmniConfig.tiny()
    config.llm.update(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2
    )
    config.vision.update(image_size=48)  # 8-pixel patches: 36 image positions
    config.speech.update(
        num_mel_bins=40,
        max_source_positions=150,
        d_model=128,
        encoder_layers=3,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        dropout=0.1,  # 3 s: 150 frames
        apply_spec_augment=True,
        mask_time_prob=0.05,
        mask_time_length=10,
        mask_time_min_masks=2,
        mask_feature_prob=0.1,
        mask_feature_length=8,
    )
    config.image_size, config.audio_seconds = 48, 3
    config.speech_stack, config.speech_ctc = 3, True  # up to 50 LLM positions per clip; the encoder pretrained by CTC
    # speech enters the LLM as the tokens its CTC head reads (soft, one position per token, the
    # blank positions unseen): a spoken question reaches the LLM where and as its text would, so
    # what stage 3 teaches about written questions applies to spoken ones
    config.speech_projector = "ctc_compress"
    config.system_prompt = ""  # a short system turn: a third fewer tokens in every step of stages 0-3
    config.speech_decoder = asdict(
        SpeechDecoderConfig.tiny(
            llm_hidden=192,
            text_vocab=320,
            units=units,
            upsample_factor=4,
            width=128,
            intermediate=256,
            layers=3,
            fusion_heads=4,
            fusion_head_dim=32,
        )
    )
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


@dataclass
class Kit:
    """What the evaluation judges with: the tokenizer's vocoder, the judge, the style classifier
    (and its held-out accuracy), and the ceiling's clips (real clips of the held-out answers in the
    unit voice, through tokenizer + vocoder)."""

    vocoder: object
    judge: object
    classifier: object
    classifier_accuracy: float
    classifier_n: int
    ceiling_waves: List[np.ndarray]
    ceiling_texts: List[str]
    report: Dict


def _clips(corpus: Path, name: str, limit: Optional[int], seed: int) -> List[Dict]:
    rows = json.loads((corpus / "tokenizer" / name).read_text())
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return [{**row, "wave": read_audio(corpus / "tokenizer" / row["audio"], 16000)[0]} for row in rows]


def build_kit(corpus: Path, size: DemoSize, out: Path, seed: int, progress: bool, timer: Timer) -> Kit:
    """The speech tokenizer and its vocoder; the round trips of the corpus' unit-voice clips; the
    judge and the style classifier trained on them."""
    from omnifast.speech import SpeechTokenizer, SpeechTokenizerConfig, UnitVocoder
    from omnifast.speech.style import StyleClassifier
    from omnifast.speech.train import config_for, evaluate_tokenizer
    from omnifast.speech.train import train_tokenizer as fit

    from .judge import train_judge

    with timer("tokenizer"):
        train = _clips(corpus, "metadata.json", size.train_limit and 8 * size.train_limit, seed)
        held = _clips(corpus, "held-out.json", size.eval_limit and 4 * size.eval_limit, seed)
        torch.manual_seed(seed)
        tokenizer = SpeechTokenizer(
            config_for(
                train + held,
                SpeechTokenizerConfig.tiny(levels=TOKENIZER_LEVELS, style_dim=0, ctc_weight=TOKENIZER_CTC_WEIGHT),
            )
        )
        fit(tokenizer, train, size.tokenizer_steps, 16, 3e-3, seed, progress)
        vocoder = UnitVocoder(tokenizer, n_iter=16)
        vocoder.save_pretrained(out / "tokenizer")
        report = evaluate_tokenizer(tokenizer, train[:200], held)
    with timer("judges"):

        def round_trip(rows):
            return vocoder.synthesize_many([tokenizer.encode(r["wave"])[0].tolist() for r in rows])

        train_rt, held_rt = round_trip(train), round_trip(held)
        classifier = StyleClassifier(list(STYLES)).fit(
            train_rt, [r["text"] for r in train], [r["emotion"] for r in train], seed=seed
        )
        accuracy = classifier.accuracy(held_rt, [r["text"] for r in held], [r["emotion"] for r in held])
        real = json.loads((corpus / "judge.json").read_text())
        real = random.Random(seed).sample(real, min(len(real), size.judge_clips))
        clips = [(read_audio(corpus / "tokenizer" / r["audio"], 16000)[0], r["text"]) for r in real]
        judge = train_judge(
            clips + [(w, r["text"]) for w, r in zip(train_rt, train)], size.judge_steps, seed=seed, progress=progress
        )
    ceiling = [(w, r["text"]) for w, r in zip(held_rt, held) if r["emotion"] == "neutral"]
    return Kit(
        vocoder, judge, classifier, accuracy, len(held), [w for w, _ in ceiling], [t for _, t in ceiling], report
    )


def run_demo(out_dir="demo_out", cache_dir=".cache", quick: bool = False, seed: int = 0, progress: bool = True) -> Dict:
    from . import evaluation, report

    size = QUICK if quick else FULL
    out, timer = Path(out_dir), Timer()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "cache", ignore_errors=True)  # a state cache is tied to the weights that made it
    started = time.perf_counter()
    with timer("corpus"):
        corpus = demo_corpus.build_corpus(cache_dir, seed, progress=progress)
    kit = build_kit(corpus, size, out, seed, progress, timer)

    def encode(path):
        return kit.vocoder.tokenizer.encode(read_audio(Path(path), kit.vocoder.sampling_rate)[0])[0].tolist()

    data = out / "data"
    with timer("units"):
        files = {name: demo_corpus.subset(corpus, name, data, size.train_limit, seed) for name in TRAIN_FILES}
        files.update({name: demo_corpus.subset(corpus, name, data, size.eval_limit, seed) for name in EVAL_FILES})
        for name in ("speech-gen", "emotion-dpo"):
            files[name] = demo_corpus.with_units(corpus, name, encode, data, size.train_limit, seed)
        for name in ("eval-t2s", "eval-emotion"):
            files[name] = demo_corpus.with_units(corpus, name, encode, data, size.eval_limit, seed)

    config = demo_config(kit.vocoder.tokenizer.config.codebook_size)
    torch.manual_seed(seed)
    model, processor = OmniModel(config), OmniProcessor(build_tiny_tokenizer(), config)
    stage_dirs = {}
    for stage in PRETRAINING + STAGES:
        with timer(f"stage {stage.index} {stage.name}"):
            records = load_records(
                files[stage.name],
                stage,
                config.speech_decoder["units"],
                media_roots=[corpus],
                audio_seconds=config.audio_seconds,
                sampling_rate=config.sampling_rate,
            )
            options = TrainConfig(
                stage=stage.name,
                lr=LEARNING_RATES[stage.name],
                epochs=10**6,
                max_steps=size.steps[stage.name],
                batch_size=size.batch_sizes.get(stage.name, size.batch_size),
                save_every=10**6,
                keep=1,
                seed=seed,
                progress=progress,
                warmup_ratio=0.1,
                trains=TRAINS.get(stage.name),
                component_lr=COMPONENT_LR.get(stage.name),
                sft_weight=SFT_WEIGHT,
                beta=DPO_BETA,
            )
            # the speech stages train the decoder on the frozen front's states, cached once
            cache = out / "cache" / stage.name if stage.loss in ("speech", "dpo") else None
            stage_dirs[stage.name] = Trainer(
                model, processor, records, options, out / "train" / f"{stage.index}-{stage.name}", state_cache=cache
            ).train()
    with timer("evaluation"):
        results = evaluation.evaluate_demo(out, files, stage_dirs, kit, size, progress, corpus)
    results["tokenizer"] = kit.report
    results["seconds"] = {**timer.seconds, "total": time.perf_counter() - started}
    results["size"] = size.name
    report.write_report(out, results, stage_dirs)
    return results
