"""The demo's measurements, each on held-out records:

- ASR character error rate of the stage-1 model;
- VQA accuracy of the final model with text questions and with spoken ones (never trained on);
- text-to-speech: the final model answers held-out prompts aloud (streamed units), the vocoder
  speaks them, the stage-1 ASR transcribes that, and the CER is against the text it wrote; the
  same loop on the tokenizer's own units of real clips is the ceiling;
- emotion: the style classifier's verdict on the decoder's speech for dialogues with unseen
  emotional statements, with the stage-4 decoder (before CTC-DPO) and the stage-5 one (after);
- latency: time to the first unit and the real-time factor of streamed generation.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from omnifast.models import OmniModel, OmniProcessor, response_states
from omnifast.audio import read_audio, write_audio
from omnifast.training.data import load_records as _load_records
from omnifast.training.loader import ConversationDataset, collate_batch
from omnifast.training.evaluate import answer_accuracy, generate_answers, references
from omnifast.training.stages import BY_NAME

from .corpus import TRANSCRIBE
from .emotion import StyleClassifier, prosody_features
from .speech import STYLES

UNIT_RATE = 25.0  # tokenizer units per second


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z ]", "", text.lower())).strip()


def cer(references_: Sequence[str], hypotheses: Sequence[str]) -> float:
    import jiwer
    return float(jiwer.cer([normalise(r) or "<empty>" for r in references_],
                           [normalise(h) or "<empty>" for h in hypotheses]))


def load(directory: Path):
    model = OmniModel.from_pretrained(directory).eval()
    return model, OmniProcessor.from_pretrained(directory, model.config)


@torch.no_grad()
def transcribe(model: OmniModel, processor: OmniProcessor, waves: Sequence[np.ndarray]) -> List[str]:
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for wave in waves:
        item = processor.encode_conversation([{"from": "human", "value": f"<speech>\n{TRANSCRIBE}"}], audios=[wave],
                                             add_generation_prompt=True)
        texts.append(model.generate(item["input_ids"], speech_features=item["speech_features"], max_new_tokens=60,
                                    eos_token_id=eos, tokenizer=processor.tokenizer).text)
    return texts


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
def speak(model: OmniModel, processor: OmniProcessor, vocoder, records, style) -> List[Dict]:
    """Each record's prompt answered aloud: text, streamed units, vocoded wave."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for record in records:
        item = processor.encode_conversation(record.conversations[:-1], add_generation_prompt=True)
        answer = model.generate(item["input_ids"], max_new_tokens=60, eos_token_id=eos, speak=True, unit_chunk=4,
                                tokenizer=processor.tokenizer)
        wave = vocoder.synthesize(answer.units, style=style)[0] if answer.units else np.zeros(640, np.float32)
        out.append({"prompt": record.conversations[-2]["value"], "text": answer.text, "units": len(answer.units),
                    "wave": wave})
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
    if not first:
        raise RuntimeError("the speech decoder generated no units for any reference answer: latency is undefined")
    return {"first_unit_s": float(np.mean(first)), "rtf": total / (units / UNIT_RATE)}


@torch.no_grad()
def dialogue_units(model: OmniModel, processor: OmniProcessor, records, batch_size: int = 8) -> List[List[int]]:
    """The decoder's units for each dialogue's own replies (teacher-forced text, as in training)."""
    dataset, units = ConversationDataset(records, processor), []
    for start in range(0, len(dataset), batch_size):
        batch = collate_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                              processor.tokenizer.pad_token_id)
        hidden = model(batch["input_ids"], batch["attention_mask"], text_loss=False).hidden_states
        states, tokens, mask = response_states(hidden, batch["labels"])
        units += model.speech_decoder.generate(states, tokens, mask, mask)
    return units


def _features(vocoder, waves: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    rows = []
    for wave, text in zip(waves, texts):
        mel, frames = vocoder.tokenizer.mel([wave])
        rows.append(prosody_features(mel[0, :, :frames[0]].cpu().numpy(), len(text)))
    return np.stack(rows)


def round_trip(vocoder, wave: np.ndarray, style) -> np.ndarray:
    """A clip through the tokenizer's units and back through the vocoder."""
    units, _ = vocoder.tokenizer.encode(wave)
    return vocoder.synthesize(units, style=style)[0]


def train_style_classifier(vocoder, clips, count: int, style, seed: int):
    """Fit on round-tripped corpus clips; returns the classifier and its held-out accuracy."""
    rng = random.Random(seed)
    chosen = rng.sample(clips, min(count, len(clips)))
    waves = [round_trip(vocoder, c["wave"], style) for c in chosen]
    features = _features(vocoder, waves, [c["text"] for c in chosen])
    labels = [c["emotion"] for c in chosen]
    cut = max(1, len(chosen) // 5)
    classifier = StyleClassifier(list(STYLES)).fit(features[cut:], labels[cut:], seed=seed)
    held_out = classifier.accuracy(features[:cut], labels[:cut])
    return StyleClassifier(list(STYLES)).fit(features, labels, seed=seed), held_out


def evaluate_demo(out: Path, files: Dict[str, Path], stage_dirs: Dict[str, Path], vocoder, clips, size, seed: int,
                  progress: bool = True, media_root: Optional[Path] = None) -> Dict:
    from tqdm.auto import tqdm
    results: Dict[str, object] = {}
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    neutral = vocoder.style_for(emotion="neutral")
    bar = tqdm(total=6, desc="evaluation", disable=not progress)

    def load_records(path, stage):  # the records name media in the corpus folder
        return _load_records(path, stage, media_roots=[media_root] if media_root else [])

    # ASR with the stage-1 model
    asr_model, processor = load(stage_dirs["s2t"])
    asr_records = load_records(files["eval-s2t"], BY_NAME["s2t"])
    hyps = generate_answers(asr_model, processor, asr_records)
    results["asr_cer"] = cer(references(asr_records), hyps)
    results["asr_examples"] = [{"reference": r, "heard": h} for r, h in zip(references(asr_records)[:5], hyps[:5])]
    bar.update()

    # VQA with the final model
    final, processor = load(stage_dirs["emotion-dpo"])
    for kind in ("text", "speech"):
        records = load_records(files[f"eval-vqa-{kind}"], BY_NAME["i2t-sft"])
        results[f"vqa_{kind}"] = answer_accuracy(final, processor, records)["accuracy"]
        results[f"vqa_{kind}_chance"] = vqa_chance(files["i2t-sft"], records)
    bar.update()

    # text-to-speech, latency
    t2s = load_records(files["eval-t2s"], BY_NAME["llm-pretrain"])
    spoken = speak(final, processor, vocoder, t2s, neutral)
    heard = transcribe(asr_model, processor, [s["wave"] for s in spoken])
    results["t2s_cer"] = cer([s["text"] for s in spoken], heard)
    real = asr_records[:len(spoken)]
    results["t2s_ceiling_cer"] = cer(references(real), transcribe(
        asr_model, processor, [round_trip(vocoder, read_audio(r.speech[0], vocoder.sampling_rate)[0], neutral) for r in real]))
    results["t2s_examples"] = [{"prompt": s["prompt"], "said": s["text"], "heard": h, "units": s["units"]}
                               for s, h in zip(spoken[:5], heard)]
    results.update(streaming_latency(final, processor, t2s))
    for i, s in enumerate(spoken[:size.wavs]):
        write_audio(wav_dir / f"t2s-{i}.wav", s["wave"])
    bar.update()

    # the style classifier, then emotion before / after CTC-DPO
    classifier, classifier_accuracy = train_style_classifier(vocoder, clips, size.classifier_clips, neutral, seed)
    results["classifier_accuracy"] = classifier_accuracy
    bar.update()
    dialogues = load_records(files["eval-emotion"], BY_NAME["emotion-dpo"])
    texts = [" ".join(t["value"] for t in r.conversations if t["from"] == "gpt") for r in dialogues]
    for when, stage in (("before", "speech-gen"), ("after", "emotion-dpo")):
        model, processor = load(stage_dirs[stage])
        units = dialogue_units(model, processor, dialogues)
        waves = [vocoder.synthesize(u, style=neutral)[0] if u else np.zeros(640, np.float32) for u in units]
        predicted = classifier.predict(_features(vocoder, waves, texts))
        results[f"emotion_{when}"] = float(np.mean([p == r.emotion for p, r in zip(predicted, dialogues)]))
        results[f"emotion_{when}_predicted"] = {s: predicted.count(s) for s in STYLES}
        saved = set()
        for r, wave in zip(dialogues, waves):
            if r.emotion not in saved and len(saved) < 3 * size.wavs:
                write_audio(wav_dir / f"{r.emotion}-{when}-dpo.wav", wave)
                saved.add(r.emotion)
        bar.update()
    results["emotion_chance"] = 1.0 / len(STYLES)
    bar.close()
    return results
