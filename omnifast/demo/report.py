"""``demo_out/report.md``: the paper's tables in miniature, the loss curves of every stage, a bar
chart of the accuracies against chance, and the generated answers as WAV files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

from omnifast.training.metrics import read_metrics


SMOKE_NOTE = ("**A smoke run** (`--quick`): every stage trained for a few steps, to show the whole pipeline runs "
              "end to end in minutes. Its figures say nothing about what the model can learn, so no target is "
              "judged here; `omnifast demo` (about 8 minutes on 2 cores) trains long enough for that.")


def code(text: str) -> str:
    """Text as inline markdown code on one line: newlines shown as spaces, backticks and pipes
    that would end the code span or a table cell escaped."""
    flat = " ".join(str(text).split()) or " "
    fence = "``" if "`" in flat else "`"
    return f"{fence} {flat.replace('|', chr(92) + '|')} {fence}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table_rows(r: Dict) -> List[Tuple[str, str, str, str]]:
    """(what, paper analogue, measured, chance or target) for each line of the report's table."""
    return [
        ("ASR CER on held-out speech (unseen captions, unseen voice; stage 1)", "Table 3 S2T", _pct(r["asr_cer"]), "lower is better"),
        ("VQA accuracy, text questions, unseen pictures (stage 3)", "Table 4", _pct(r["vqa_text"]),
         f"chance {_pct(r['vqa_text_chance'])}; target >= 90%"),
        ("VQA accuracy, spoken questions (unseen voice), never trained on: language as pivot", "Table 1 OmniBench",
         _pct(r["vqa_speech"]), f"chance {_pct(r['vqa_speech_chance'])}; target well above chance"),
        ("T2S: CER of our stage-1 ASR on the vocoded generated answers (held-out prompts)", "Table 3 T2S",
         _pct(r["t2s_cer"]), f"ceiling (real clips through tokenizer + vocoder): {_pct(r['t2s_ceiling_cer'])}"),
        ("emotion accuracy of generated speech, before / after CTC-DPO (style classifier)", "Table 2",
         f"{_pct(r['emotion_before'])} / {_pct(r['emotion_after'])}",
         f"chance {_pct(r['emotion_chance'])}; classifier on held-out corpus clips {_pct(r['classifier_accuracy'])}"),
        ("speech generation latency: first unit, real-time factor (streamed; the held-out answers fed token by token)", "Sec. 4.3",
         f"{1000 * r['first_unit_s']:.0f} ms, RTF {r['rtf']:.3f}", "RTF < 1: faster than real time"),
    ]


def numbers(r: Dict) -> List[float]:
    """Every figure in the table (the test suite checks they are finite)."""
    keys = ("asr_cer", "vqa_text", "vqa_text_chance", "vqa_speech", "vqa_speech_chance", "t2s_cer", "t2s_ceiling_cer",
            "emotion_before", "emotion_after", "emotion_chance", "classifier_accuracy", "first_unit_s", "rtf")
    return [float(r[k]) for k in keys]


def targets(r: Dict) -> List[str]:
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    return [f"VQA with text questions >= 90%: {met(r['vqa_text'] >= 0.9)} ({_pct(r['vqa_text'])})",
            f"spoken-question VQA well above chance (taken as >= 1.5x chance): "
            f"{met(r['vqa_speech'] >= 1.5 * r['vqa_speech_chance'])} ({_pct(r['vqa_speech'])} vs {_pct(r['vqa_speech_chance'])})",
            f"emotion accuracy higher after DPO than before: {met(r['emotion_after'] > r['emotion_before'])} "
            f"({_pct(r['emotion_before'])} -> {_pct(r['emotion_after'])})"]


def plot_losses(out: Path, stage_dirs: Dict[str, Path]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(stage_dirs)
    columns = 3
    fig, axes = plt.subplots(math.ceil(len(names) / columns), columns, figsize=(12, 6), squeeze=False)
    for axis, name in zip(axes.flat, names):
        rows = read_metrics(stage_dirs[name].parent / "metrics.jsonl")
        axis.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        axis.set_title(f"{stage_dirs[name].parent.name}")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=90)
    plt.close(fig)
    return "losses.png"


def plot_results(out: Path, r: Dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = [("VQA text", r["vqa_text"], r["vqa_text_chance"]), ("VQA spoken", r["vqa_speech"], r["vqa_speech_chance"]),
            ("emotion before DPO", r["emotion_before"], r["emotion_chance"]),
            ("emotion after DPO", r["emotion_after"], r["emotion_chance"]),
            ("1 - ASR CER", max(0.0, 1 - r["asr_cer"]), None), ("1 - T2S CER", max(0.0, 1 - r["t2s_cer"]), None)]
    fig, axis = plt.subplots(figsize=(9, 3.8))
    x = range(len(bars))
    axis.bar(x, [b[1] for b in bars], color="tab:blue", label="measured")
    for i, (_, _, chance) in enumerate(bars):
        if chance is not None:
            axis.hlines(chance, i - 0.4, i + 0.4, colors="tab:red", label="chance" if i == 0 else None)
    axis.set_xticks(list(x), [b[0] for b in bars], rotation=15)
    axis.set_ylim(0, 1)
    axis.legend()
    axis.set_title("omnifast demo: held-out results")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90)
    plt.close(fig)
    return "results.png"


def write_report(out: Path, r: Dict, stage_dirs: Dict[str, Path]) -> Path:
    out = Path(out)
    losses, results = plot_losses(out, stage_dirs), plot_results(out, r)
    lines = ["# omnifast demo: a tiny omni model that sees, hears and speaks with emotion", "",
             f"Run: `{r['size']}` size, {r['seconds']['total']:.0f} s on this machine. Every figure below was measured "
             "by this run on held-out records (see `metrics.json`).", "",
             "| what | paper analogue | measured | chance / reference |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(r)]
    if r["size"] == "quick":
        lines += ["", SMOKE_NOTE]
    else:
        lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(r)]
    tok = r["tokenizer"]
    lines += ["", "## The speech tokenizer", "",
              f"- CER of its CTC head on held-out corpus clips: {_pct(tok.get('cer', float('nan')))}",
              f"- emotion read from the units alone: {_pct(tok['emotion']['from_units'])}, from the style vector: "
              f"{_pct(tok['emotion']['from_style'])} (chance {_pct(tok['emotion']['chance'])})",
              f"- voice read from the units alone: {_pct(tok['voice']['from_units'])}, from the style vector: "
              f"{_pct(tok['voice']['from_style'])} (chance {_pct(tok['voice']['chance'])})",
              "", "## Examples", "", "ASR (stage 1), held-out captions:", ""]
    lines += [f"- {code(e['reference'])} -> {code(e['heard'])}" for e in r["asr_examples"]]
    lines += ["", "Spoken answers (the final model's text, and what the stage-1 ASR heard in its speech):", ""]
    lines += [f"- {code(e['prompt'])} -> said {code(e['said'])} ({e['units']} units) -> heard {code(e['heard'])}"
              for e in r["t2s_examples"]]
    lines += ["", f"Predicted styles of the dialogue answers: before DPO {r['emotion_before_predicted']}, "
              f"after DPO {r['emotion_after_predicted']}.", "",
              "WAV files of generated answers are in `wavs/` (`t2s-*.wav`; `<emotion>-before-dpo.wav` / "
              "`<emotion>-after-dpo.wav`).", "", "## Loss curves", "", f"![losses]({losses})", "",
              "## Results against chance", "", f"![results]({results})", "", "## Time", ""]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in r["seconds"].items()]
    final = stage_dirs.get("emotion-dpo")
    if final is not None:
        lines += ["", "## Talk to it", "", "```", f"omnifast chat --model {final} --vocoder {out / 'tokenizer'} "
                  "--text 'what colour is the sun' --stream --out answer.wav", "```"]
    (out / "metrics.json").write_text(json.dumps(r, indent=2, default=str))
    report = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return report
