"""The demo corpus: eSpeak NG speech and Pillow pictures, turned into OpenOmni JSON records for
every stage and held-out records for every evaluation.

The language (all text lower case, no punctuation): scene captions (``two red circles on the
left``), four picture questions, facts (``what colour is the sky`` -> ``the sky is blue``), and
emotional statements (happy, sad, angry) with a reply from a pool per emotion.

What is held out, and from what:
- the LLM's stand-in for a pretrained LLM (``llm-pretrain``) reads every sentence of the language:
  what is held out is speech, pictures and spoken renditions, never the words;
- voices: the speech encoder's stand-in for a pretrained Whisper (``speech-pretrain``) hears
  twelve eSpeak voices; stages 1-3 hear three of them; ``EVAL_VOICE`` speaks only evaluation
  clips (the ASR and the spoken VQA questions);
- speech: no training clip says a held-out caption, and no unit target (stages 4-5) or tokenizer
  clip says a held-out caption or a held-out fact's answer (text-to-speech);
- pictures: the evaluation scenes are never drawn for training;
- images and speech are never paired in a training record: the spoken-question VQA comes only
  from language as the pivot (spoken alternatives of text records and spoken questions about a
  written caption, ``test_corpus`` checks it);
- emotion: half the statements of each emotion are held out of CTC-DPO; the emotion evaluation
  is every held-out statement in a dialogue with ten facts. CTC-DPO's anchors (prompts that ask
  for no emotion, their neutral units as chosen and rejected) say training facts and sentences only.

``build_corpus`` writes it under a cache folder once; later calls return the folder.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omnifast.durable import write_json

from .images import COLOURS, POSITIONS, SHAPES, Scene, draw
from .speech import EVAL_VOICE, PRETRAIN_VOICES, STYLES, TRAIN_VOICES, Speaker

VERSION = 11
UNIT_VOICE = TRAIN_VOICES[0]  # the voice whose clips give the answers' units (and the tokenizer's)
EMOTIONS = ("happy", "sad", "angry")
WINDOW_SECONDS = 3  # the demo model's speech window
TRANSCRIBE = "what did you hear"  # the stage-1 instruction
DESCRIBE = "describe the picture"  # the stage-2 instruction
NUMBERS = ("one", "two", "three", "four", "five")
HELD_OUT_STATEMENTS = 7  # per emotion, never in CTC-DPO
TOKENIZER_BABBLE = 300  # random sequences among the tokenizer's clips (besides the language's)
BABBLE = {"llm-pretrain": 300, "speech-pretrain": 300, "s2t": 600, "speech-gen": 300}
FACT_REPEATS = 8  # copies of each fact record in the LLM's text  # random word sequences
EMOTION_EVAL_FACTS = 10  # facts each held-out statement is evaluated with
DPO_ANCHORS = 100  # copying prompts among CTC-DPO's anchors (besides the training facts)

STATEMENTS = {
    "happy": [
        "i just won a prize",
        "my best friend is coming to visit",
        "i passed my exam today",
        "we are going to the beach",
        "i got a new puppy",
        "my sister had a baby",
        "i finished my first painting",
        "we won the football match",
        "i found my lost ring",
        "my garden is full of flowers",
        "i got the job i wanted",
        "my team finished the project early",
        "we are going on holiday tomorrow",
        "my grandmother is feeling better",
    ],
    "sad": [
        "i lost my old dog",
        "my friend moved far away",
        "i failed my test",
        "it rained on my birthday",
        "my favourite cup broke",
        "nobody came to my party",
        "my cat is sick",
        "i miss my family",
        "the old tree in our garden fell",
        "i lost my wallet",
        "my best friend forgot my birthday",
        "the shop where i worked closed",
        "my plants all died",
        "i have to say goodbye to my class",
    ],
    "angry": [
        "the train was late again",
        "someone broke my bike",
        "they lied to me",
        "my order never arrived",
        "my neighbour plays loud music",
        "someone ate my lunch",
        "the bus drove past without stopping",
        "they charged me twice",
        "my brother broke my phone",
        "the shop sold me a broken lamp",
        "somebody scratched my car",
        "they cancelled my flight again",
        "my landlord kept my deposit",
        "the printer jammed again",
    ],
}
REPLIES = {
    "happy": ["that is wonderful news", "how lovely", "well done that is great", "what a happy day"],
    "sad": ["i am so sorry to hear that", "that must feel lonely", "i am sorry that is hard", "oh that is a pity"],
    "angry": ["that is really annoying", "that is outrageous", "that is not fair at all", "that is so frustrating"],
}


def reply_to(emotion: str, index: int) -> str:
    return REPLIES[emotion][index % len(REPLIES[emotion])]


def facts() -> List[Tuple[str, str]]:
    """Question -> answer pairs the LLM learns as text and the speech decoder learns to speak."""
    things = [
        ("sky", "blue"),
        ("grass", "green"),
        ("banana", "yellow"),
        ("tomato", "red"),
        ("lemon", "yellow"),
        ("leaf", "green"),
        ("sea", "blue"),
        ("cherry", "red"),
        ("strawberry", "red"),
        ("frog", "green"),
        ("sun", "yellow"),
        ("blueberry", "blue"),
    ]
    out = [(f"what colour is the {thing}", f"the {thing} is {colour}") for thing, colour in things]
    out += [
        ("how many sides does a triangle have", "a triangle has three sides"),
        ("how many sides does a square have", "a square has four sides"),
    ]
    for a in range(1, 5):
        for b in range(1, 6 - a):
            out.append(
                (
                    f"what is {NUMBERS[a - 1]} plus {NUMBERS[b - 1]}",
                    f"{NUMBERS[a - 1]} plus {NUMBERS[b - 1]} is {NUMBERS[a + b - 1]}",
                )
            )
    return out


def scenes() -> List[Scene]:
    return [Scene(s, c, n, p) for s in SHAPES for c in COLOURS for n in (1, 2, 3) for p in POSITIONS]


def picture_questions(scene: Scene) -> List[Tuple[str, str]]:
    return [(q.lower().rstrip("?"), a) for q, a in scene.questions()]


QUESTIONS = tuple(q for q, _ in picture_questions(scenes()[0]))


def _slug(text: str) -> str:
    return text.replace(" ", "_")[:60]


@dataclass(frozen=True)
class Split:
    """What is held out (a fixed draw from the seed): scenes, facts and emotional statements."""

    train_scenes: Tuple[Scene, ...]
    eval_scenes: Tuple[Scene, ...]
    train_facts: Tuple[Tuple[str, str], ...]
    eval_facts: Tuple[Tuple[str, str], ...]
    train_statements: Tuple[Tuple[str, str, str], ...]  # (emotion, statement, reply)
    eval_statements: Tuple[Tuple[str, str, str], ...]

    def sentences(self) -> List[str]:
        """Every sentence of the language, held-out ones included (what the LLM reads)."""
        out = [s.caption() for s in self.train_scenes + self.eval_scenes] + list(QUESTIONS)
        out += [t for pair in self.train_facts + self.eval_facts for t in pair]
        out += [t for _, statement, _ in self.train_statements + self.eval_statements for t in (statement,)]
        out += [r for replies in REPLIES.values() for r in replies]
        return list(dict.fromkeys(out))

    def words(self) -> List[str]:
        return sorted({w for sentence in self.sentences() for w in sentence.split()})

    def babble(self, rng: random.Random, count: int) -> List[str]:
        """``count`` random sequences of 3-6 words of the language (none a held-out sentence): what
        makes a model read words rather than recognise whole sentences."""
        words, unheard, out = self.words(), self.unheard(), []
        while len(out) < count:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
            if text not in unheard:
                out.append(text)
        return out

    def unheard(self) -> set:
        """Sentences no training clip of the omni model says: held-out captions and the answers of
        held-out facts (the text-to-speech evaluation)."""
        return {s.caption() for s in self.eval_scenes} | {a for _, a in self.eval_facts}


def make_split(seed: int = 0, eval_scenes: int = 24, eval_facts: int = 6) -> Split:
    rng = random.Random(seed)
    all_scenes, all_facts = scenes(), facts()
    rng.shuffle(all_scenes)
    rng.shuffle(all_facts)
    statements = {e: [(e, s, reply_to(e, i)) for i, s in enumerate(ss)] for e, ss in STATEMENTS.items()}
    for rows in statements.values():
        rng.shuffle(rows)
    train = tuple(row for rows in statements.values() for row in rows[HELD_OUT_STATEMENTS:])
    held = tuple(row for rows in statements.values() for row in rows[:HELD_OUT_STATEMENTS])
    return Split(
        tuple(all_scenes[eval_scenes:]),
        tuple(all_scenes[:eval_scenes]),
        tuple(all_facts[eval_facts:]),
        tuple(all_facts[:eval_facts]),
        train,
        held,
    )


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
            samples = self.speaker.say(text, style, voice)
            if samples.size > WINDOW_SECONDS * self.speaker.sampling_rate:
                if style != "neutral":  # a long random sequence said slowly: said plainly instead
                    return self.clip(text, voice, "neutral")
                raise ValueError(
                    f"{text!r} in {voice} lasts {samples.size / self.speaker.sampling_rate:.2f} s, "
                    f"longer than the model's {WINDOW_SECONDS} s speech window"
                )
            self.write_audio(self.root / name, samples, self.speaker.sampling_rate)
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
    write_json(path, records, indent=1)


def _text_records(split: Split, rng: random.Random) -> List[Dict]:
    """``llm-pretrain``: the language as text (copying, facts, reading captions, dialogues)."""
    lm = [
        {"id": f"copy-{i}", "conversations": _turns(f"{t}\n{TRANSCRIBE}", t)}
        for i, t in enumerate(split.sentences() + split.babble(rng, BABBLE["llm-pretrain"]))
    ]
    lm += [
        {"id": f"fact-{i}-{k}", "conversations": _turns(q, a)}  # a few facts among many records: repeated
        for i, (q, a) in enumerate(split.train_facts + split.eval_facts)
        for k in range(FACT_REPEATS)
    ]
    # reading a caption to answer the picture questions: what the pictures will be read as (language as pivot)
    lm += [
        {"id": f"read-{i}-{j}", "conversations": _turns(f"{s.caption()}\n{q}", a)}
        for i, s in enumerate(split.train_scenes + split.eval_scenes)
        for j, (q, a) in enumerate(picture_questions(s))
    ]
    all_facts = split.train_facts + split.eval_facts
    lm += [
        {"id": f"talk-{i}-{j}", "conversations": _turns(statement, reply, *fact)}
        for i, (_, statement, reply) in enumerate(split.train_statements + split.eval_statements)
        for j, fact in enumerate(rng.sample(all_facts, 4))
    ]
    return lm


def build_corpus(
    cache_dir, seed: int = 0, image_size: int = 48, takes: int = 3, pretrain_takes: int = 6, progress: bool = True
) -> Path:
    """Build (or find) the corpus under ``cache_dir``; returns its folder. ``takes``: how many
    (voice, style) draws speak each stage-1 sentence; ``pretrain_takes``: each speech-encoder
    pretraining sentence."""
    from tqdm.auto import tqdm

    root = Path(cache_dir) / f"demo-corpus-v{VERSION}-s{seed}-i{image_size}-t{takes}-p{pretrain_takes}"
    if (root / "done").is_file():
        return root
    building = root.with_name(root.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    studio, rng, split = _Studio(building), random.Random(seed), make_split(seed)
    bar = tqdm(total=8, desc="corpus", disable=not progress)
    combos = [(v, s) for v in TRAIN_VOICES for s in STYLES]
    heard = [t for t in split.sentences() if t not in {s.caption() for s in split.eval_scenes}]
    babble = {name: split.babble(rng, count) for name, count in BABBLE.items() if name != "llm-pretrain"}

    # the stand-ins of pretrained models: the LLM reads the language, the speech encoder hears it
    lm = _text_records(split, rng)
    _dump(building / "llm-pretrain.json", lm)
    pretrain_combos = [(v, s) for v in PRETRAIN_VOICES for s in STYLES]
    _dump(
        building / "speech-pretrain.json",
        [
            {
                "id": f"hear-{i}-{k}",
                "speech": studio.clip(text, voice, style),
                "conversations": _turns("<speech>", text),
            }
            for i, text in enumerate(heard)
            # the picture questions, short and few, in every voice and style: a Whisper has heard
            # its language's common phrases many times
            for k, (voice, style) in enumerate(
                pretrain_combos if text in QUESTIONS else rng.sample(pretrain_combos, pretrain_takes)
            )
        ]
        + [
            {
                "id": f"hear-babble-{i}",
                "speech": studio.clip(text, *rng.choice(pretrain_combos)),
                "conversations": _turns("<speech>", text),
            }
            for i, text in enumerate(babble["speech-pretrain"])
        ],
    )
    bar.update()

    # stage 1: speech -> text (training voices); held out: unseen captions, unseen voice
    s2t = []
    for text in heard + babble["s2t"]:
        # the questions (the pivot) in every voice and style; a random sequence once
        draws = (
            combos if text in QUESTIONS else [rng.choice(combos)] if text not in heard else rng.sample(combos, takes)
        )
        for voice, style in draws:
            s2t.append(
                {
                    "id": f"s2t-{len(s2t)}",
                    "speech": studio.clip(text, voice, style),
                    "conversations": _turns(f"<speech>\n{TRANSCRIBE}", text),
                }
            )
    # spoken questions about a written caption: speech in a text context (no picture)
    asked = []
    for scene in split.train_scenes:
        for question, answer in rng.sample(picture_questions(scene), 2):
            voice, style = rng.choice(combos)
            asked.append(
                {
                    "id": f"ask-{len(asked)}",
                    "speech": studio.clip(question, voice, style),
                    "conversations": _turns(f"{scene.caption()}\n<speech>", answer),
                }
            )
    # facts with spoken alternatives (OpenOmni's layout: one clip per human turn, drawn per epoch)
    spoken_facts = [
        {"id": f"fact-spoken-{i}", "speech": [studio.clip(q, *rng.choice(combos))], "conversations": _turns(q, a)}
        for i, (q, a) in enumerate(split.train_facts)
    ]
    _dump(building / "s2t.json", s2t + asked + spoken_facts)
    _dump(
        building / "eval-s2t.json",
        [
            {
                "id": f"asr-{i}",
                "speech": studio.clip(s.caption(), EVAL_VOICE, rng.choice(list(STYLES))),
                "conversations": _turns(f"<speech>\n{TRANSCRIBE}", s.caption()),
            }
            for i, s in enumerate(split.eval_scenes)
        ],
    )
    _dump(
        building / "eval-s2t-train-voices.json",
        [
            {
                "id": f"asr-tv-{i}",
                "speech": studio.clip(s.caption(), *rng.choice(combos)),
                "conversations": _turns(f"<speech>\n{TRANSCRIBE}", s.caption()),
            }
            for i, s in enumerate(split.eval_scenes)
        ],
    )
    bar.update()

    # stages 2 and 3: pictures
    _dump(
        building / "i2t-pretrain.json",
        [
            {
                "id": f"cap-{i}",
                "image": studio.picture(s, image_size),
                "conversations": _turns(f"<image>\n{DESCRIBE}", s.caption()),
            }
            for i, s in enumerate(split.train_scenes)
        ],
    )
    vqa = [
        {"id": f"vqa-{i}-{j}", "image": studio.picture(s, image_size), "conversations": _turns(f"<image>\n{q}", a)}
        for i, s in enumerate(split.train_scenes)
        for j, (q, a) in enumerate(picture_questions(s))
    ]
    # LLaVA's SFT mix keeps text-only conversations (the language); ours also keeps the speech
    # conversations of stage 1, so the LLM that trains here still reads speech (none has a picture)
    text = [r for r in lm if r["id"].startswith(("copy", "fact", "read", "talk"))]
    _dump(
        building / "i2t-sft.json",
        vqa + rng.sample(text, len(vqa) // 2) + asked + spoken_facts + rng.sample(s2t, len(vqa) // 4),
    )
    bar.update()
    eval_vqa = [
        (i, j, s, q, a) for i, s in enumerate(split.eval_scenes) for j, (q, a) in enumerate(picture_questions(s))
    ]
    _dump(
        building / "eval-vqa-text.json",
        [
            {
                "id": f"vqa-text-{i}-{j}",
                "image": studio.picture(s, image_size),
                "conversations": _turns(f"<image>\n{q}", a),
            }
            for i, j, s, q, a in eval_vqa
        ],
    )
    spoken_vqa = [(i, j, s, studio.clip(q, EVAL_VOICE, rng.choice(list(STYLES))), a) for i, j, s, q, a in eval_vqa]
    _dump(
        building / "eval-vqa-speech.json",
        [
            {
                "id": f"vqa-speech-{i}-{j}",
                "image": studio.picture(s, image_size),
                "speech": clip,
                "conversations": _turns("<image>\n<speech>", a),
            }
            for i, j, s, clip, a in spoken_vqa
        ],
    )
    # the same clips asked about the picture's caption, written: the spoken half of the pivot alone
    _dump(
        building / "eval-vqa-caption-speech.json",
        [
            {
                "id": f"vqa-caption-speech-{i}-{j}",
                "speech": clip,
                "conversations": _turns(f"{s.caption()}\n<speech>", a),
            }
            for i, j, s, clip, a in spoken_vqa
        ],
    )
    bar.update()

    # stage 4: answers in neutral speech (units filled in by with_units); nothing said is held out
    def spoken(texts: Sequence[str], style: str) -> List[str]:
        return [studio.clip(t, UNIT_VOICE, style) for t in texts]

    unheard = split.unheard()
    pairs = [(f"{t}\n{TRANSCRIBE}", t) for t in split.sentences() if t not in unheard]  # the copying, answered aloud
    pairs += list(split.train_facts)
    pairs += [(s, r) for _, s, r in split.train_statements + split.eval_statements]
    gen = [
        {"id": f"say-{i}", "conversations": _turns(q, a), "units_from": spoken([a], "neutral")}
        for i, (q, a) in enumerate(pairs)
    ]
    gen += [
        {
            "id": f"say-babble-{i}",
            "conversations": _turns(f"{t}\n{TRANSCRIBE}", t),
            "units_from": spoken([t], "neutral"),
        }
        for i, t in enumerate(babble["speech-gen"])
    ]
    gen += [
        {"id": f"say-talk-{i}-{j}", "conversations": _turns(s, r, *fact), "units_from": spoken([r, fact[1]], "neutral")}
        for i, (_, s, r) in enumerate(split.train_statements)
        for j, fact in enumerate(rng.sample(split.train_facts, 2))
    ]
    _dump(building / "speech-gen.pending.json", gen)
    prompts = list(split.eval_facts) + [(f"{s.caption()}\n{TRANSCRIBE}", s.caption()) for s in split.eval_scenes]
    _dump(
        building / "eval-t2s.pending.json",
        [
            {"id": f"t2s-{i}", "conversations": _turns(q, a), "units_from": spoken([a], "neutral")}
            for i, (q, a) in enumerate(prompts)
        ],
    )
    bar.update()

    # stage 5: dialogues; chosen = the replies in the context's emotion, rejected = neutral
    def dialogue(rid: str, emotion: str, statement: str, reply: str, question: str, answer: str) -> Dict:
        return {
            "id": rid,
            "emotion": emotion,
            "conversations": _turns(statement, reply, question, answer),
            "units_from": spoken([reply, answer], emotion),
            "rejected_units_from": spoken([reply, answer], "neutral"),
        }

    train_talks = [(e, s, r, q, a) for e, s, r in split.train_statements for q, a in split.train_facts]
    dpo = [dialogue(f"dpo-{i}", *t) for i, t in enumerate(train_talks)]
    # anchors: prompts that ask for no emotion (the facts, and copying the language's sentences) with
    # their neutral units as both chosen and rejected, so that only the chosen NLL acts on them and
    # the preference for emotion does not carry over to them (their own draw: the rest of the corpus
    # stays as it was)
    calm = list(split.train_facts) + random.Random(f"anchors-{seed}").sample(
        [(q, a) for q, a in pairs if q.endswith(TRANSCRIBE)], DPO_ANCHORS
    )
    dpo += [
        {
            "id": f"dpo-anchor-{i}",
            "emotion": "neutral",
            "conversations": _turns(q, a),
            "units_from": spoken([a], "neutral"),
            "rejected_units_from": spoken([a], "neutral"),
        }
        for i, (q, a) in enumerate(calm)
    ]
    _dump(building / "emotion-dpo.pending.json", dpo)
    eval_facts = list(split.eval_facts) + list(split.train_facts[: EMOTION_EVAL_FACTS - len(split.eval_facts)])
    eval_talks = [(e, s, r, q, a) for e, s, r in split.eval_statements for q, a in eval_facts]
    _dump(building / "eval-emotion.pending.json", [dialogue(f"emo-{i}", *t) for i, t in enumerate(eval_talks)])
    bar.update()

    # the speech tokenizer's corpus: the unit voice's clips in every style, held-out sentences apart
    for text in split.sentences():
        for style in STYLES:
            studio.clip(text, UNIT_VOICE, style)
    (building / "tokenizer").mkdir(exist_ok=True)
    language = set(split.sentences())
    rows = [row for row in studio.clips.values() if row["voice"] == UNIT_VOICE and row["text"] in language]
    rows += rng.sample(
        [row for row in studio.clips.values() if row["voice"] == UNIT_VOICE and row["text"] not in language],
        TOKENIZER_BABBLE,
    )
    _dump(building / "tokenizer" / "metadata.json", [r for r in rows if r["text"] not in unheard])
    _dump(building / "tokenizer" / "held-out.json", [r for r in rows if r["text"] in unheard])
    bar.update()
    # the judge's corpus: every clip of a pretraining voice (its unit-voice clips are heard round-tripped)
    _dump(
        building / "judge.json",
        [r for r in studio.clips.values() if r["voice"] in PRETRAIN_VOICES and r["text"] not in unheard],
    )
    (building / "done").write_text(json.dumps({"clips": len(studio.clips), "version": VERSION}))
    bar.update()
    bar.close()
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return root


def with_units(corpus: Path, name: str, encode, out_dir: Path, limit: Optional[int] = None, seed: int = 0) -> Path:
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
                value = record[key]
                record[key] = (
                    [str((corpus / v).resolve()) for v in value]
                    if isinstance(value, list)
                    else str((corpus / value).resolve())
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    _dump(out_dir / f"{name}.json", records)
    return out_dir / f"{name}.json"
