"""The demo corpus: eSpeak NG speech and Pillow pictures, turned into OpenOmni JSON records for
every stage and held-out records for every evaluation.

What it holds (all text lower case, no punctuation):
- sentences: scene captions, the four picture questions, facts (``what colour is the sky`` ->
  ``the sky is blue``), emotional statements with a fitting reply;
- speech: each sentence spoken by three training voices in the four styles; a fourth voice
  (``EVAL_VOICE``) speaks only held-out material;
- records: ``llm-pretrain`` (text only: the tiny LLM's stand-in for a pretrained LLM), ``s2t``,
  ``i2t-pretrain``, ``i2t-sft``, and the unit stages ``speech-gen`` / ``emotion-dpo``, whose units
  come from the speech tokenizer trained on this corpus (:func:`with_units`);
- held-out: ASR clips of unseen captions, VQA on unseen pictures with text questions and with
  SPOKEN questions (no stage trains on image + speech), unseen facts for text-to-speech, and
  dialogues with unseen emotional statements.

``build_corpus`` writes it under a cache folder once; later calls return the folder.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .images import Scene, draw, SHAPES, COLOURS, POSITIONS
from .speech import STYLES, VOICES, Speaker

VERSION = 6
TRAIN_VOICES, EVAL_VOICE = VOICES[:3], VOICES[3]
UNIT_VOICE = VOICES[0]             # the voice whose clips give the answers' units
EMOTIONS = ("happy", "sad", "angry")
TRANSCRIBE = "what did you hear"   # the stage-1 instruction
DESCRIBE = "describe the picture"  # the stage-2 instruction
NUMBERS = ("one", "two", "three", "four", "five")

CONTEXTS = {  # emotion -> (statement, reply); the last of each is held out
    "happy": [("i just won a prize", "that is wonderful news"), ("my best friend is coming to visit", "how lovely"),
              ("i passed my exam today", "well done that is great"), ("we are going to the beach", "what a happy day")],
    "sad": [("i lost my old dog", "i am so sorry to hear that"), ("my friend moved far away", "that must feel lonely"),
            ("i failed my test", "i am sorry that is hard"), ("it rained on my birthday", "oh that is a pity")],
    "angry": [("the train was late again", "that is really annoying"), ("someone broke my bike", "that is outrageous"),
              ("they lied to me", "that is not fair at all"), ("my order never arrived", "that is so frustrating")],
}


def facts() -> List[Tuple[str, str]]:
    """Question -> answer pairs the LLM learns as text and the speech decoder learns to speak."""
    things = [("sky", "blue"), ("grass", "green"), ("banana", "yellow"), ("tomato", "red"), ("lemon", "yellow"),
              ("leaf", "green"), ("sea", "blue"), ("cherry", "red"), ("strawberry", "red"), ("frog", "green"),
              ("sun", "yellow"), ("blueberry", "blue")]
    out = [(f"what colour is the {thing}", f"the {thing} is {colour}") for thing, colour in things]
    out += [("how many sides does a triangle have", "a triangle has three sides"),
            ("how many sides does a square have", "a square has four sides")]
    for a in range(1, 5):
        for b in range(1, 6 - a):
            out.append((f"what is {NUMBERS[a - 1]} plus {NUMBERS[b - 1]}", f"{NUMBERS[a - 1]} plus {NUMBERS[b - 1]} is "
                        f"{NUMBERS[a + b - 1]}"))
    return out


def scenes() -> List[Scene]:
    return [Scene(s, c, n, p) for s in SHAPES for c in COLOURS for n in (1, 2, 3) for p in POSITIONS]


def picture_questions(scene: Scene) -> List[Tuple[str, str]]:
    return [(q.lower().rstrip("?"), a) for q, a in scene.questions()]


def _slug(text: str) -> str:
    return text.replace(" ", "_")[:60]


@dataclass(frozen=True)
class Split:
    """Which scenes, facts and statements are held out (a fixed draw from the seed)."""
    train_scenes: Tuple[Scene, ...]
    eval_scenes: Tuple[Scene, ...]
    train_facts: Tuple[Tuple[str, str], ...]
    eval_facts: Tuple[Tuple[str, str], ...]


def make_split(seed: int = 0, eval_scenes: int = 24, eval_facts: int = 6) -> Split:
    rng = random.Random(seed)
    all_scenes, all_facts = scenes(), facts()
    rng.shuffle(all_scenes)
    rng.shuffle(all_facts)
    return Split(tuple(all_scenes[eval_scenes:]), tuple(all_scenes[:eval_scenes]), tuple(all_facts[eval_facts:]),
                 tuple(all_facts[:eval_facts]))


class _Studio:
    """Writes each (text, voice, style) clip and each picture once; returns paths relative to the corpus."""

    def __init__(self, root: Path):
        from omnifast.audio import write_audio
        self.root, self.speaker, self.write_audio = root, Speaker(), write_audio
        (root / "audio").mkdir(parents=True, exist_ok=True)
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.clips: Dict[str, Dict[str, str]] = {}

    def clip(self, text: str, voice: str, style: str) -> str:
        name = f"audio/{_slug(text)}-{voice.replace('en+', '')}-{style}.wav"
        if name not in self.clips:
            self.write_audio(self.root / name, self.speaker.say(text, style, voice), self.speaker.sampling_rate)
            self.clips[name] = {"audio": "../" + name, "text": text, "emotion": style, "voice": voice}
        return name

    def picture(self, scene: Scene, size: int) -> str:
        name = f"images/{scene.shape}-{scene.colour}-{scene.count}-{scene.position}.png"
        if not (self.root / name).is_file():
            draw(scene, size).save(self.root / name)
        return name


def _turns(*texts: str) -> List[Dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def _dump(path: Path, records: List[Dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def build_corpus(cache_dir, seed: int = 0, image_size: int = 48, takes: int = 3, progress: bool = True) -> Path:
    """Build (or find) the corpus under ``cache_dir``; returns its folder. ``takes``: how many
    (voice, style) draws speak each stage-1 sentence."""
    from tqdm.auto import tqdm
    root = Path(cache_dir) / f"demo-corpus-v{VERSION}-s{seed}-i{image_size}-t{takes}"
    if (root / "done").is_file():
        return root
    building = root.with_name(root.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    studio, rng, split = _Studio(building), random.Random(seed), make_split(seed)
    bar = tqdm(total=7, desc="corpus", disable=not progress)
    combos = [(v, s) for v in TRAIN_VOICES for s in STYLES]

    # stage 0 (text): copying, facts, dialogues and picture questions as text, for the LLM
    questions = [q for q, _ in picture_questions(split.train_scenes[0])]
    sentences = [s.caption() for s in split.train_scenes] + questions
    sentences += [t for pair in facts() for t in pair] + [t for pairs in CONTEXTS.values() for pair in pairs for t in pair]
    lm = [{"id": f"copy-{i}", "conversations": _turns(f"{t}\n{TRANSCRIBE}", t)} for i, t in enumerate(sentences)]
    lm += [{"id": f"fact-{i}", "conversations": _turns(q, a)} for i, (q, a) in enumerate(facts())]
    # reading a caption to answer the picture questions: what the pictures will be read as (language as pivot)
    lm += [{"id": f"read-{i}-{j}", "conversations": _turns(f"{s.caption()}\n{q}", a)}
           for i, s in enumerate(split.train_scenes) for j, (q, a) in enumerate(picture_questions(s))]
    lm += [{"id": f"talk-{e}-{i}-{j}", "conversations": _turns(s, r, q, a)}
           for e, pairs in CONTEXTS.items() for i, (s, r) in enumerate(pairs) for j, (q, a) in enumerate(facts())]
    _dump(building / "llm-pretrain.json", lm)
    bar.update()

    # stage 1: speech -> transcript (training voices); held out: unseen captions, unseen voice
    s2t = []
    for i, text in enumerate(sentences):
        draws = combos if text in questions else rng.sample(combos, takes)  # the pivot: every voice and style
        for voice, style in draws:
            s2t.append({"id": f"s2t-{len(s2t)}", "speech": studio.clip(text, voice, style),
                        "conversations": _turns(f"<speech>\n{TRANSCRIBE}", text)})
    for question, answer in split.train_facts:  # spoken questions answered: speech the LLM understands, not only copies
        for voice, style in rng.sample(combos, takes):
            s2t.append({"id": f"s2t-{len(s2t)}", "speech": studio.clip(question, voice, style),
                        "conversations": _turns("<speech>", answer)})
    for i, scene in enumerate(split.train_scenes):  # a spoken question about a caption: speech in a text context
        for question, answer in rng.sample(picture_questions(scene), 2):
            voice, style = rng.choice(combos)
            s2t.append({"id": f"s2t-{len(s2t)}", "speech": studio.clip(question, voice, style),
                        "conversations": _turns(f"{scene.caption()}\n<speech>", answer)})
    _dump(building / "s2t.json", s2t)
    _dump(building / "eval-s2t.json", [
        {"id": f"asr-{i}", "speech": studio.clip(s.caption(), EVAL_VOICE, rng.choice(list(STYLES))),
         "conversations": _turns(f"<speech>\n{TRANSCRIBE}", s.caption())} for i, s in enumerate(split.eval_scenes)])
    bar.update()

    # stages 2 and 3: pictures
    _dump(building / "i2t-pretrain.json", [
        {"id": f"cap-{i}", "image": studio.picture(s, image_size), "conversations": _turns(f"<image>\n{DESCRIBE}", s.caption())}
        for i, s in enumerate(split.train_scenes)])
    vqa = [{"id": f"vqa-{i}-{j}", "image": studio.picture(s, image_size), "conversations": _turns(f"<image>\n{q}", a)}
           for i, s in enumerate(split.train_scenes) for j, (q, a) in enumerate(picture_questions(s))]
    # LLaVA's SFT mix keeps text-only conversations; so does ours (the copying and the facts)
    # the tiny LLM forgets fast: the SFT mix also keeps the speech conversations of stage 1 (no record
    # pairs a picture with speech)
    _dump(building / "i2t-sft.json", vqa + [r for r in lm if r["id"].startswith(("copy", "fact"))] +
          rng.sample(s2t, min(len(s2t), len(vqa) // 2)))
    bar.update()
    eval_vqa = [(i, j, s, q, a) for i, s in enumerate(split.eval_scenes) for j, (q, a) in enumerate(picture_questions(s))]
    _dump(building / "eval-vqa-text.json", [
        {"id": f"vqa-text-{i}-{j}", "image": studio.picture(s, image_size), "conversations": _turns(f"<image>\n{q}", a)}
        for i, j, s, q, a in eval_vqa])
    _dump(building / "eval-vqa-speech.json", [
        {"id": f"vqa-speech-{i}-{j}", "image": studio.picture(s, image_size),
         "speech": studio.clip(q, EVAL_VOICE, rng.choice(list(STYLES))), "conversations": _turns("<image>\n<speech>", a)}
        for i, j, s, q, a in eval_vqa])
    bar.update()

    # stage 4: facts and replies, answered in neutral speech (units filled in by with_units)
    def spoken(texts: Sequence[str], style: str) -> List[str]:
        return [studio.clip(t, UNIT_VOICE, style) for t in texts]

    pairs = split.train_facts + tuple(p for pairs in CONTEXTS.values() for p in pairs[:-1])
    unheard = {t for pair in split.eval_facts for t in pair}  # held out for text-to-speech
    pairs += tuple((f"{t}\n{TRANSCRIBE}", t) for t in sentences if t not in unheard)  # the copying, answered aloud
    _dump(building / "speech-gen.pending.json", [
        {"id": f"say-{i}", "conversations": _turns(q, a), "units_from": spoken([a], "neutral")}
        for i, (q, a) in enumerate(pairs)])
    prompts = list(split.eval_facts) + [(f"{s.caption()}\n{TRANSCRIBE}", s.caption()) for s in split.eval_scenes]
    _dump(building / "eval-t2s.json", [{"id": f"t2s-{i}", "conversations": _turns(q, a)} for i, (q, a) in enumerate(prompts)])
    bar.update()

    # stage 5: dialogues; chosen = the replies in the context's emotion, rejected = neutral
    def dialogue(rid: str, emotion: str, statement: str, reply: str, question: str, answer: str) -> Dict:
        return {"id": rid, "emotion": emotion, "conversations": _turns(statement, reply, question, answer),
                "units_from": spoken([reply, answer], emotion), "rejected_units_from": spoken([reply, answer], "neutral")}

    train_talks = [(e, s, r, q, a) for e, pairs in CONTEXTS.items() for s, r in pairs[:-1] for q, a in split.train_facts]
    _dump(building / "emotion-dpo.pending.json", [dialogue(f"dpo-{i}", *t) for i, t in enumerate(train_talks)])
    eval_talks = [(e, *pairs[-1], *fact) for e, pairs in CONTEXTS.items() for fact in split.train_facts[:4] + split.eval_facts]
    _dump(building / "eval-emotion.pending.json", [dialogue(f"emo-{i}", *t) for i, t in enumerate(eval_talks)])
    bar.update()

    # the speech tokenizer's corpus: every training-voice clip, with its style and voice labels
    (building / "tokenizer").mkdir(exist_ok=True)
    rows = [row for row in studio.clips.values() if row["voice"] != EVAL_VOICE]
    _dump(building / "tokenizer" / "metadata.json", rows)
    (building / "done").write_text(json.dumps({"clips": len(studio.clips), "version": VERSION}))
    bar.update()
    bar.close()
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return root


def with_units(corpus: Path, name: str, encode, out_dir: Path, limit: Optional[int] = None,
               seed: int = 0) -> Path:
    """``<name>.pending.json`` with ``units_from`` clips turned into ``tgt_units`` (and
    ``rejected_units_from`` into ``re_tgt_units``) by ``encode(path) -> list of units``; media
    paths made absolute. Writes ``out_dir/<name>.json`` (at most ``limit`` records, a seeded
    draw) and returns it."""
    records = json.loads((corpus / f"{name}.pending.json").read_text())
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    cache: Dict[str, List[int]] = {}

    def units(paths: Iterable[str]) -> str:
        out: List[int] = []
        for path in paths:
            if path not in cache:
                cache[path] = list(encode(corpus / path))
            out += cache[path]
        return " ".join(map(str, out))

    rows = []
    for record in records:
        row = {k: v for k, v in record.items() if not k.endswith("_from")}
        row["tgt_units"] = units(record["units_from"])
        if "rejected_units_from" in record:
            row["re_tgt_units"] = units(record["rejected_units_from"])
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    _dump(out_dir / f"{name}.json", rows)
    return out_dir / f"{name}.json"


def subset(corpus: Path, name: str, out_dir: Path, limit: Optional[int], seed: int = 0) -> Path:
    """``<name>.json`` with media paths made absolute (and at most ``limit`` records) in ``out_dir``."""
    records = json.loads((corpus / f"{name}.json").read_text())
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    for record in records:
        for key in ("image", "speech"):
            if key in record:
                record[key] = str((corpus / record[key]).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    _dump(out_dir / f"{name}.json", records)
    return out_dir / f"{name}.json"
