"""The demo's measurements, each on held-out records, each beside its chance level and sample size:

- ASR: character error rate of the stage-1 model's transcripts of unseen captions, spoken by the
  unseen voice (and by the training voices);
- VQA on unseen pictures with written questions and with spoken ones (no training record pairs a
  picture with speech: language as the pivot);
- text-to-speech: the final model answers held-out prompts aloud (streamed units), the vocoder
  speaks them and the judge (``judge.py``, trained for judging only) transcribes them: the CER
  against the text the model said; the ceiling is the unit voice's real clips of the same answers
  through tokenizer + vocoder + judge; and the unit error rate of the decoder's units (on the
  reference answer) against the reference clip's units;
- emotion: the style classifier, validated on held-out corpus clips after the tokenizer + vocoder
  round trip, judges the speech the decoder makes for dialogues with held-out statements, with the
  stage-4 decoder (before CTC-DPO) and the stage-5 one (after), compared by a two-proportion test;
  CTC-DPO's rewards on the held-out pairs;
- latency: time to the first unit and the real-time factor of streamed generation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from omnifast.audio import write_audio
from omnifast.models import OmniModel, OmniProcessor
from omnifast.speech.style import two_proportion_test
from omnifast.training.data import load_records as _load_records
from omnifast.training.evaluate import (
    answer_accuracy,
    emotion_accuracy,
    generate_answers,
    preference_metrics,
    references,
    response_text,
    unit_error_rate,
)
from omnifast.training.stages import BY_NAME

from .speech import STYLES

UNIT_RATE = 25.0  # tokenizer units per second


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z ]", "", text.lower())).strip()


def cer(references_: Sequence[str], hypotheses: Sequence[str]) -> float:
    import jiwer

    return float(
        jiwer.cer([normalise(r) or "<empty>" for r in references_], [normalise(h) or "<empty>" for h in hypotheses])
    )


def load(directory: Path):
    model = OmniModel.from_pretrained(directory).eval()
    return model, OmniProcessor.from_pretrained(directory, model.config)


def vqa_chance(train_file: Path, records) -> float:
    """Guessing uniformly among the answers that question has in training."""
    answers: Dict[str, set] = {}
    for row in json.loads(train_file.read_text()):
        turns = row["conversations"]
        if "image" in row and len(turns) == 2:
            answers.setdefault(turns[0]["value"].split("\n")[-1], set()).add(turns[1]["value"])
    options = [len(answers.get(q, ())) or 1 for q in _questions(records)]
    return float(np.mean([1.0 / n for n in options]))


def _questions(records) -> List[str]:
    """The text question of each VQA record, or for a spoken one the text of its clip's name."""
    out = []
    for r in records:
        text = r.conversations[0]["value"].split("\n")[-1]
        out.append(text if text != "<speech>" else r.speech[0].name.rsplit("-", 2)[0].replace("_", " "))
    return out


@torch.no_grad()
def speak(model: OmniModel, processor: OmniProcessor, vocoder, records) -> List[Dict]:
    """Each record's prompt answered aloud (greedy text, streamed units), the units vocoded."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for record in records:
        item = processor.encode_conversation(record.conversations[:-1], add_generation_prompt=True)
        answer = model.generate(
            item["input_ids"],
            max_new_tokens=60,
            eos_token_id=eos,
            speak=True,
            unit_chunk=4,
            tokenizer=processor.tokenizer,
        )
        out.append({"prompt": record.conversations[-2]["value"], "text": answer.text, "units": answer.units})
    for row, wave in zip(out, vocoder.synthesize_many([row["units"] for row in out])):
        row["wave"] = wave
    return out


@torch.no_grad()
def streaming_latency(model: OmniModel, processor: OmniProcessor, records) -> Dict[str, float]:
    """First-unit time and real-time factor of streamed speech for each record's reference answer,
    fed token by token (``forced_tokens``: the same work as generating it)."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    first, total, units = [], 0.0, 0
    for record in records:
        item = processor.encode_conversation(record.conversations[:-1], add_generation_prompt=True)
        answer = processor.tokenizer(record.conversations[-1]["value"], add_special_tokens=False)["input_ids"] + [eos]
        out = model.generate(item["input_ids"], speak=True, unit_chunk=4, forced_tokens=answer)
        if out.units:
            first.append(out.first_unit_s)
            total, units = total + out.total_s, units + len(out.units)
    if not first:  # a decoder that speaks no unit (the quick run's) has no latency to measure
        return {"first_unit_s": None, "rtf": None, "latency_n": 0}
    return {"first_unit_s": float(np.mean(first)), "rtf": total / (units / UNIT_RATE), "latency_n": len(first)}


def evaluate_demo(
    out: Path,
    files: Dict[str, Path],
    stage_dirs: Dict[str, Path],
    kit,
    size,
    progress: bool = True,
    media_root: Optional[Path] = None,
) -> Dict:
    """Every figure of the report. ``kit``: the tokenizer's vocoder, the judge, the style classifier
    and the held-out round trips (``run.py``)."""
    from tqdm.auto import tqdm

    results: Dict[str, object] = {}
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=5, desc="evaluation", disable=not progress)

    def records_of(name, stage):  # the records name media in the corpus folder
        return _load_records(files[name], BY_NAME[stage], media_roots=[media_root] if media_root else [])

    # ASR with the stage-1 model, on the unseen voice and on the training voices
    asr_model, processor = load(stage_dirs["s2t"])
    for key, name in (("asr", "eval-s2t"), ("asr_train_voices", "eval-s2t-train-voices")):
        records = records_of(name, "s2t")
        hyps = generate_answers(asr_model, processor, records)
        results[f"{key}_cer"], results[f"{key}_n"] = cer(references(records), hyps), len(records)
        results[f"{key}_examples"] = [{"reference": r, "heard": h} for r, h in zip(references(records)[:5], hyps[:5])]
    bar.update()

    # VQA with the final model
    final, processor = load(stage_dirs["emotion-dpo"])
    for kind in ("text", "speech", "caption_speech"):
        records = records_of(f"eval-vqa-{kind.replace('_', '-')}", "i2t-sft")
        results[f"vqa_{kind}"] = answer_accuracy(final, processor, records)["accuracy"]
        results[f"vqa_{kind}_chance"] = vqa_chance(files["i2t-sft"], records)
        results[f"vqa_{kind}_n"] = len(records)
    bar.update()

    # text-to-speech, judged by the judge; its ceiling; the unit error rate; latency
    t2s = records_of("eval-t2s", "speech-gen")
    spoken = speak(final, processor, kit.vocoder, t2s)
    heard = kit.judge.transcribe([s["wave"] for s in spoken])
    results["t2s_cer"], results["t2s_n"] = cer([s["text"] for s in spoken], heard), len(spoken)
    results["t2s_ceiling_cer"] = cer(kit.ceiling_texts, kit.judge.transcribe(kit.ceiling_waves))
    results["t2s_ceiling_n"] = len(kit.ceiling_waves)
    stage4 = load(stage_dirs["speech-gen"])[0]  # the same answers spoken before CTC-DPO
    before = speak(stage4, processor, kit.vocoder, t2s)
    results["t2s_stage4_cer"] = cer([s["text"] for s in before], kit.judge.transcribe([s["wave"] for s in before]))
    results["t2s_unit_error_rate"] = unit_error_rate(final, processor, t2s)["unit_error_rate"]
    results["t2s_examples"] = [
        {"prompt": s["prompt"], "said": s["text"], "heard": h, "units": len(s["units"])}
        for s, h in zip(spoken[:5], heard)
    ]
    results.update(streaming_latency(final, processor, t2s))
    for i, s in enumerate(spoken[: size.wavs]):
        write_audio(wav_dir / f"t2s-{i}.wav", s["wave"])
    bar.update()

    # emotion before / after CTC-DPO on dialogues with held-out statements
    results["classifier_accuracy"], results["classifier_n"] = kit.classifier_accuracy, kit.classifier_n
    dialogues = records_of("eval-emotion", "emotion-dpo")
    for when, model in (("before", stage4), ("after", final)):
        found = emotion_accuracy(model, processor, dialogues, kit.vocoder, kit.classifier)
        results[f"emotion_{when}"], results[f"emotion_{when}_correct"] = found["accuracy"], found["correct"]
        results[f"emotion_{when}_predicted"] = found["predicted"]
        saved = set()
        for record, wave in zip(dialogues, found["waves"]):
            if record.emotion not in saved:
                write_audio(wav_dir / f"{record.emotion}-{when}-dpo.wav", wave)
                saved.add(record.emotion)
    # the classifier's ceiling on these dialogues: the real renditions' units, through the vocoder
    texts = [response_text(r) for r in dialogues]
    for key, units, labels in (
        ("emotion_reference", [r.tgt_units for r in dialogues], [r.emotion for r in dialogues]),
        ("neutral_reference", [r.re_tgt_units for r in dialogues], ["neutral"] * len(dialogues)),
    ):
        results[key] = kit.classifier.accuracy(kit.vocoder.synthesize_many(units), texts, labels)
    results["emotion_n"] = len(dialogues)
    results["emotion_contexts"] = len({r.conversations[0]["value"] for r in dialogues})
    results["emotion_chance"] = 1.0 / len(STYLES)
    z, p = two_proportion_test(
        results["emotion_before_correct"], len(dialogues), results["emotion_after_correct"], len(dialogues)
    )
    results["emotion_z"], results["emotion_p"] = z, p
    results["dpo_held_out"] = preference_metrics(final, processor, dialogues, stage4)
    bar.update()
    bar.close()
    return results
