"""``demo_out/report.md``: the papers' claims in miniature, each figure beside its target, chance
level and sample size; the loss curves of every stage, a chart of the results against chance and
targets, and the generated answers as WAV files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

from omnifast.durable import write_json
from omnifast.training.metrics import read_metrics

SMOKE_NOTE = (
    "**A smoke run** (`--quick`): every stage trained for a few steps, to show the whole pipeline runs "
    "end to end in minutes. Its figures say nothing about what the model can learn, so no target is "
    "judged here; `omnifast demo` trains long enough for that."
)


def code(text: str) -> str:
    """Text as inline markdown code on one line: newlines shown as spaces, backticks and pipes
    that would end the code span or a table cell escaped."""
    flat = " ".join(str(text).split()) or " "
    fence = "``" if "`" in flat else "`"
    return f"{fence} {flat.replace('|', chr(92) + '|')} {fence}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table_rows(r: Dict) -> List[Tuple[str, str, str, str, str]]:
    """(what, paper analogue, measured, chance / target, n) for each line of the report's table."""
    return [
        (
            "ASR CER, unseen captions spoken by an unseen voice (stage 1)",
            "Table 3 S2T",
            _pct(r["asr_cer"]),
            "target <= 5%",
            str(r["asr_n"]),
        ),
        (
            "ASR CER, unseen captions spoken by the training voices",
            "Table 3 S2T",
            _pct(r["asr_train_voices_cer"]),
            "-",
            str(r["asr_train_voices_n"]),
        ),
        (
            "VQA accuracy, written questions, unseen pictures (stage 3)",
            "Table 4",
            _pct(r["vqa_text"]),
            f"chance {_pct(r['vqa_text_chance'])}; target >= 90%",
            str(r["vqa_text_n"]),
        ),
        (
            "VQA accuracy, spoken questions (unseen voice), no picture ever paired with speech: language as pivot",
            "Table 1 OmniBench",
            _pct(r["vqa_speech"]),
            f"chance {_pct(r['vqa_speech_chance'])}; target >= 2x chance and within 15 points of written",
            str(r["vqa_speech_n"]),
        ),
        (
            "the same spoken questions about the unseen pictures' written captions (speech read in a text context)",
            "-",
            _pct(r["vqa_caption_speech"]),
            f"chance {_pct(r['vqa_caption_speech_chance'])}",
            str(r["vqa_caption_speech_n"]),
        ),
        (
            "T2S: CER of the judge on the generated spoken answers (held-out prompts)",
            "Table 3 T2S",
            _pct(r["t2s_cer"]),
            "target <= 10%",
            str(r["t2s_n"]),
        ),
        (
            "T2S before CTC-DPO: the same, spoken by the stage-4 model",
            "Table 3 T2S",
            _pct(r["t2s_stage4_cer"]),
            "target <= 10%",
            str(r["t2s_n"]),
        ),
        (
            "T2S ceiling: the judge on real clips of the same answers through tokenizer + vocoder",
            "-",
            _pct(r["t2s_ceiling_cer"]),
            "target <= 5%",
            str(r["t2s_ceiling_n"]),
        ),
        (
            "T2S unit error rate of the decoder's units against the reference clip's",
            "-",
            _pct(r["t2s_unit_error_rate"]),
            "-",
            str(r["t2s_n"]),
        ),
        (
            "style classifier on held-out corpus clips after the tokenizer + vocoder round trip",
            "-",
            _pct(r["classifier_accuracy"]),
            f"chance {_pct(r['emotion_chance'])}; target >= 90%",
            str(r["classifier_n"]),
        ),
        (
            "stage-4 (neutral-only) decoder's dialogue speech heard as neutral",
            "-",
            _pct(r["emotion_before_predicted"]["neutral"] / r["emotion_n"]),
            "target >= 80%",
            str(r["emotion_n"]),
        ),
        (
            "the classifier on the real renditions of the same dialogues (tokenizer + vocoder): "
            "neutral heard neutral, emotional heard in their emotion",
            "-",
            f"{_pct(r['neutral_reference'])}, {_pct(r['emotion_reference'])}",
            f"chance {_pct(r['emotion_chance'])}",
            str(r["emotion_n"]),
        ),
        (
            "emotion accuracy of generated speech before / after CTC-DPO (held-out statements)",
            "Table 2",
            f"{_pct(r['emotion_before'])} / {_pct(r['emotion_after'])} (z = {r['emotion_z']:.1f}, "
            f"p = {r['emotion_p']:.1g})",
            f"chance {_pct(r['emotion_chance'])}; target after >= 60%, p < 0.01",
            f"{r['emotion_n']} ({r['emotion_contexts']} contexts)",
        ),
        (
            "CTC-DPO on the held-out pairs: rewards/accuracies, rewards/margins",
            "-",
            f"{_pct(r['dpo_held_out']['rewards/accuracies'])}, {r['dpo_held_out']['rewards/margins']:.2f}",
            "chance 50%",
            str(r["emotion_n"]),
        ),
        (
            "speech generation latency: first unit, real-time factor (streamed)",
            "Sec. 4.3",
            f"{1000 * r['first_unit_s']:.0f} ms, RTF {r['rtf']:.3f}" if r["latency_n"] else "- (no units spoken)",
            "RTF < 1: faster than real time",
            str(r["latency_n"]),
        ),
    ]


def numbers(r: Dict) -> List[float]:
    """Every figure in the table (the test suite checks they are finite)."""
    keys = (
        "asr_cer",
        "asr_train_voices_cer",
        "vqa_text",
        "vqa_text_chance",
        "vqa_speech",
        "vqa_speech_chance",
        "vqa_caption_speech",
        "vqa_caption_speech_chance",
        "t2s_cer",
        "t2s_stage4_cer",
        "t2s_ceiling_cer",
        "t2s_unit_error_rate",
        "classifier_accuracy",
        "emotion_before",
        "emotion_after",
        "neutral_reference",
        "emotion_reference",
        "emotion_chance",
        "emotion_z",
        "emotion_p",
    ) + (("first_unit_s", "rtf") if r["latency_n"] else ())
    return [float(r[k]) for k in keys] + [float(v) for v in r["dpo_held_out"].values()]


def targets(r: Dict) -> List[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    neutral = r["emotion_before_predicted"]["neutral"] / r["emotion_n"]
    return [
        f"ASR CER on the unseen voice <= 5%: {met(r['asr_cer'] <= 0.05)} ({_pct(r['asr_cer'])})",
        f"VQA with written questions >= 90%: {met(r['vqa_text'] >= 0.9)} ({_pct(r['vqa_text'])})",
        f"spoken-question VQA >= 2x chance and within 15 points of written: "
        f"{met(r['vqa_speech'] >= 2 * r['vqa_speech_chance'] and r['vqa_speech'] >= r['vqa_text'] - 0.15)} "
        f"({_pct(r['vqa_speech'])}; chance {_pct(r['vqa_speech_chance'])}, written {_pct(r['vqa_text'])})",
        f"T2S CER <= 10%: {met(r['t2s_cer'] <= 0.10)} ({_pct(r['t2s_cer'])}; before CTC-DPO "
        f"{_pct(r['t2s_stage4_cer'])}, {met(r['t2s_stage4_cer'] <= 0.10)})",
        f"T2S ceiling <= 5%: {met(r['t2s_ceiling_cer'] <= 0.05)} ({_pct(r['t2s_ceiling_cer'])})",
        f"style classifier on held-out round trips >= 90%: {met(r['classifier_accuracy'] >= 0.9)} "
        f"({_pct(r['classifier_accuracy'])})",
        f"the stage-4 decoder's speech heard as neutral >= 80%: {met(neutral >= 0.8)} ({_pct(neutral)}; the real "
        f"neutral renditions {_pct(r['neutral_reference'])})",
        f"emotion accuracy after CTC-DPO >= 60% and above before at p < 0.01: "
        f"{met(r['emotion_after'] >= 0.6 and r['emotion_p'] < 0.01)} ({_pct(r['emotion_before'])} -> "
        f"{_pct(r['emotion_after'])}, z = {r['emotion_z']:.1f}, p = {r['emotion_p']:.1g})",
    ]


def plot_losses(out: Path, stage_dirs: Dict[str, Path]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stage_dirs)
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(names) / columns), columns, figsize=(14, 6), squeeze=False)
    for axis, name in zip(axes.flat, names):
        rows = read_metrics(stage_dirs[name].parent / "metrics.jsonl")
        axis.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        axis.set_title(f"{stage_dirs[name].parent.name}")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=90)
    plt.close(fig)
    return "losses.png"


def plot_results(out: Path, r: Dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("1 - ASR CER", max(0.0, 1 - r["asr_cer"]), None, 0.95),
        ("VQA written", r["vqa_text"], r["vqa_text_chance"], 0.9),
        ("VQA spoken", r["vqa_speech"], r["vqa_speech_chance"], max(2 * r["vqa_speech_chance"], r["vqa_text"] - 0.15)),
        ("1 - T2S CER", max(0.0, 1 - r["t2s_cer"]), None, 0.9),
        ("emotion before DPO", r["emotion_before"], r["emotion_chance"], None),
        ("emotion after DPO", r["emotion_after"], r["emotion_chance"], 0.6),
    ]
    fig, axis = plt.subplots(figsize=(10, 4))
    x = range(len(bars))
    axis.bar(x, [b[1] for b in bars], color="tab:blue", label="measured")
    for i, (_, _, chance, target) in enumerate(bars):
        if chance is not None:
            axis.hlines(chance, i - 0.4, i + 0.4, colors="tab:red", label="chance" if i == 1 else None)
        if target is not None:
            axis.hlines(
                target, i - 0.4, i + 0.4, colors="tab:green", linestyles="dashed", label="target" if i == 0 else None
            )
    axis.set_xticks(list(x), [b[0] for b in bars], rotation=15)
    axis.set_ylim(0, 1)
    axis.legend(loc="lower right")
    axis.set_title("omnifast demo: held-out results")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90)
    plt.close(fig)
    return "results.png"


def write_report(out: Path, r: Dict, stage_dirs: Dict[str, Path]) -> Path:
    out = Path(out)
    losses, results = plot_losses(out, stage_dirs), plot_results(out, r)
    lines = [
        "# omnifast demo: a tiny omni model that sees, hears and speaks with emotion",
        "",
        f"Run: `{r['size']}` size, {r['seconds']['total']:.0f} s on this machine. Every figure below was measured "
        "by this run on held-out records (see `metrics.json`).",
        "",
        "| what | paper analogue | measured | chance / target | n |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {n} |" for a, b, c, d, n in table_rows(r)]
    if r["size"] == "quick":
        lines += ["", SMOKE_NOTE]
    else:
        lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(r)]
    tok = r["tokenizer"]
    lines += [
        "",
        "## The speech tokenizer (units alone: the units carry the prosody)",
        "",
        f"- CER of its CTC head on held-out corpus clips: {_pct(tok.get('cer', float('nan')))}",
        f"- emotion read from the units alone (a probe on unit histograms): {_pct(tok['emotion']['from_units'])} "
        f"(chance {_pct(tok['emotion']['chance'])})",
        "",
        "## Examples",
        "",
        "ASR (stage 1), held-out captions in the unseen voice:",
        "",
    ]
    lines += [f"- {code(e['reference'])} -> {code(e['heard'])}" for e in r["asr_examples"]]
    lines += ["", "Spoken answers (the final model's text, and what the judge heard in its speech):", ""]
    lines += [
        f"- {code(e['prompt'])} -> said {code(e['said'])} ({e['units']} units) -> heard {code(e['heard'])}"
        for e in r["t2s_examples"]
    ]
    lines += [
        "",
        f"Styles the classifier heard in the dialogue speech: before DPO {r['emotion_before_predicted']}, "
        f"after DPO {r['emotion_after_predicted']}.",
        "",
        f"CTC-DPO on the held-out pairs (TRL's names): {json.dumps(r['dpo_held_out'])}.",
        "",
        "WAV files of generated answers are in `wavs/` (`t2s-*.wav`; `<emotion>-before-dpo.wav` / "
        "`<emotion>-after-dpo.wav`).",
        "",
        "## Loss curves",
        "",
        f"![losses]({losses})",
        "",
        "## Results against chance and targets",
        "",
        f"![results]({results})",
        "",
        "## Time",
        "",
    ]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in r["seconds"].items()]
    final = stage_dirs.get("emotion-dpo")
    if final is not None:
        lines += [
            "",
            "## Talk to it",
            "",
            "```",
            f"omnifast chat --model {final} --vocoder {out / 'tokenizer'} "
            "--text 'what colour is the sun' --stream --out answer.wav",
            "```",
        ]
    write_json(out / "metrics.json", r, indent=2, default=str)
    report = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return report
