"""Training and measuring the speech tokenizer on a folder of clips.

The folder holds ``metadata.json``: a list of ``{"audio": "clip.wav", "text": "...", <label>:
<value>, ...}``; every key besides audio and text is a style label (emotion, pitch, speed,
speaker, ...). ``omnifast tokenizer train --data DIR --out DIR`` trains, holds out a fifth of the
clips, and reports the losses and the disentanglement: how well each style label is predicted
from the units alone (should be near chance) and from the style vector (should be high), and the
character error rate of the CTC head.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from omnifast.durable import write_json
from omnifast.schedule import warmup_cosine

from .tokenizer import SpeechTokenizer, SpeechTokenizerConfig
from .vocoder import UnitVocoder


def load_corpus(directory, sampling_rate: int = 16000) -> List[Dict]:
    """Records with their samples loaded (``wave``: mono, resampled to ``sampling_rate``); every
    problem reported at once."""
    from omnifast.audio import AudioError, read_audio

    directory = Path(directory)
    meta = directory / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist: the corpus folder needs a metadata.json")
    rows = json.loads(meta.read_text())
    problems, records = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "audio" not in row or not isinstance(row.get("text", ""), str):
            problems.append(f"{meta}: record {i}: needs 'audio' (a path) and 'text'")
            continue
        path = directory / row["audio"]
        if not path.is_file():
            problems.append(f"{meta}: record {i}: audio: missing file {path}")
            continue
        try:
            records.append({**row, "wave": read_audio(path, sampling_rate)[0]})
        except AudioError as error:
            problems.append(f"{meta}: record {i}: audio: {error}")
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the corpus:\n" + "\n".join(problems))
    return records


def label_names(records: Sequence[Dict]) -> List[str]:
    return sorted({k for r in records for k in r if k not in ("audio", "text", "wave")})


def config_for(records: Sequence[Dict], base: SpeechTokenizerConfig) -> SpeechTokenizerConfig:
    """``base`` with the corpus' characters as the CTC vocabulary and its style labels."""
    base.vocabulary = sorted({c for r in records for c in r.get("text", "")})
    base.style_labels = {name: sorted({str(r[name]) for r in records if name in r}) for name in label_names(records)}
    return base


def split(records: Sequence[Dict], held_out: float = 0.2, seed: int = 0):
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * held_out))
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]]


def train_tokenizer(
    tokenizer: SpeechTokenizer,
    records: Sequence[Dict],
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """AdamW with a cosine schedule on random batches; returns the losses of every step."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    names = label_names(records)
    mels = [tokenizer.mel([r["wave"]]) for r in records]  # the front end runs once per clip
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 19, decay_from_start=True))
    generator = torch.Generator().manual_seed(seed)
    history = []
    tokenizer.train()
    for _ in tqdm(range(steps), desc="tokenizer", disable=not progress):
        batch = torch.randint(0, len(records), (min(batch_size, len(records)),), generator=generator).tolist()
        frames = torch.cat([mels[i][1] for i in batch])
        mel = torch.zeros(len(batch), tokenizer.config.n_mels, int(frames.max()))
        for row, i in enumerate(batch):
            mel[row, :, : mels[i][0].shape[2]] = mels[i][0][0]
        labels = {n: [str(records[i][n]) for i in batch] for n in names}
        out = tokenizer(mel, frames, [records[i].get("text", "") for i in batch], labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(
            {
                "loss": out.loss.item(),
                "mel": out.mel_loss.item(),
                "ctc": out.ctc_loss.item() if out.ctc_loss is not None else None,
                "style": out.style_loss.item() if out.style_loss is not None else None,
            }
        )
    tokenizer.eval()
    return history


def _probe_accuracy(train_x, train_y, test_x, test_y, classes: int, steps: int = 300) -> float:
    """A logistic-regression probe (standardised features), trained on one split, scored on the other."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    return (probe(test_x).argmax(-1) == test_y).float().mean().item()


@torch.no_grad()
def evaluate_tokenizer(tokenizer: SpeechTokenizer, train_records: Sequence[Dict], test_records: Sequence[Dict]) -> Dict:
    """Character error rate of the CTC head and, per style label, the held-out accuracy of a probe
    reading the units alone (a histogram of each FSQ dimension's levels) and one reading the
    style vector, with the chance level (the majority class of the training split)."""
    import jiwer

    levels = tokenizer.config.levels

    def features(records):
        unit_rows, style_rows = [], []
        for r in records:
            units, style = tokenizer.encode(r["wave"])
            codes = tokenizer.fsq.indices_to_codes(units)
            digits = torch.round((codes + 1) * torch.tensor([l // 2 for l in levels])).long()
            hist = [
                torch.bincount(digits[:, d], minlength=l).float() / max(len(units), 1) for d, l in enumerate(levels)
            ]
            unit_rows.append(torch.cat(hist))
            style_rows.append(style.cpu())
        return torch.stack(unit_rows), torch.stack(style_rows)

    report: Dict[str, object] = {}
    texts = [r.get("text", "") for r in test_records]
    if tokenizer.config.vocabulary and any(texts):
        hyps = [tokenizer.transcribe(r["wave"]) or "<empty>" for r in test_records]
        report["cer"] = jiwer.cer(texts, hyps)
    train_units, train_style = features(train_records)
    test_units, test_style = features(test_records)
    for name, values in tokenizer.config.style_labels.items():
        train_y = torch.tensor([values.index(str(r[name])) for r in train_records])
        test_y = torch.tensor([values.index(str(r[name])) for r in test_records])
        with torch.enable_grad():
            from_units = _probe_accuracy(train_units, train_y, test_units, test_y, len(values))
            from_style = (
                _probe_accuracy(train_style, train_y, test_style, test_y, len(values))
                if tokenizer.config.has_style
                else None
            )
        majority = torch.bincount(train_y, minlength=len(values)).argmax()
        report[name] = {
            "from_units": from_units,
            "from_style": from_style,
            "chance": (test_y == majority).float().mean().item(),
        }
    return report


def train_command(args) -> int:
    """``omnifast tokenizer train``: train on a corpus folder, save tokenizer + vocoder, report."""
    records = load_corpus(args.data)
    train_records, test_records = split(records, seed=args.seed)
    base = SpeechTokenizerConfig.tiny() if args.size == "tiny" else SpeechTokenizerConfig()
    torch.manual_seed(args.seed)
    tokenizer = SpeechTokenizer(config_for(records, base))
    history = train_tokenizer(
        tokenizer, train_records, args.steps, args.batch_size, args.lr, args.seed, not args.no_progress
    )
    names = label_names(records)
    vocoder = UnitVocoder(tokenizer).fit_centroids(
        [r["wave"] for r in train_records], {n: [str(r[n]) for r in train_records] for n in names}
    )
    out = Path(args.out)
    vocoder.save_pretrained(out)
    report = {
        "first_losses": history[0],
        "last_losses": history[-1],
        "evaluation": evaluate_tokenizer(tokenizer, train_records, test_records),
    }
    write_json(out / "report.json", report, indent=2)
    (out / "losses.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    print(json.dumps(report, indent=2))
    return 0


def add_arguments(parser) -> None:
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser("train", help="train a speech tokenizer and its vocoder on a corpus folder")
    train.add_argument("--data", required=True, help="folder with metadata.json and the clips")
    train.add_argument("--out", required=True, help="output folder (tokenizer, vocoder centroids, report)")
    train.add_argument("--steps", type=int, default=300, help="(default: 300)")
    train.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    train.add_argument("--lr", type=float, default=2e-3, help="(default: 2e-3)")
    train.add_argument("--size", choices=("tiny", "base"), default="tiny", help="(default: tiny)")
    train.add_argument("--seed", type=int, default=0, help="(default: 0)")
    train.add_argument("--no-progress", action="store_true")
