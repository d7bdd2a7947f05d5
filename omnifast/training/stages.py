"""The five training stages of OpenOmni as data: what each trains, on what loss, with which
defaults. One trainer runs them all (``trainer.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True, kw_only=True)
class Stage:
    index: int
    name: str
    trains: Tuple[str, ...]  # OmniModel components that get gradients; all others frozen
    loss: str  # "text" (next token), "speech" (decoder CTC / NTP), "dpo" (CTC-DPO),
    # "ctc" (the speech encoder's CTC on the transcript)
    requires: Tuple[str, ...]  # record fields every example of this stage must have
    lr: float
    warmup_ratio: float
    epochs: int
    component_lr: Dict[str, float] = field(default_factory=dict)  # per-component learning rates
    note: str = ""


STAGES: Tuple[Stage, ...] = (
    Stage(
        index=1,
        name="s2t",
        trains=("speech_projector",),
        loss="text",
        requires=("speech",),
        lr=1e-3,
        warmup_ratio=0.3,
        epochs=1,
        note="lr 1e-3 as in the paper (its code uses 1e-4); LLM and Whisper frozen",
    ),
    Stage(
        index=2,
        name="i2t-pretrain",
        trains=("image_projector",),
        loss="text",
        requires=("image",),
        lr=1e-3,
        warmup_ratio=0.3,
        epochs=1,
    ),
    Stage(
        index=3,
        name="i2t-sft",
        trains=("llm", "image_projector", "vision"),
        loss="text",
        requires=(),
        lr=5e-5,
        warmup_ratio=0.3,
        epochs=1,
        component_lr={"vision": 2e-6},
        note="the vision tower trains at its own, lower lr",
    ),
    Stage(
        index=4,
        name="speech-gen",
        trains=("speech_decoder",),
        loss="speech",
        requires=("tgt_units",),
        lr=5e-4,
        warmup_ratio=0.3,
        epochs=3,
        note="LLM frozen and run without grad; NAR: fused linear-CTC, AR: next-unit prediction",
    ),
    Stage(
        index=5,
        name="emotion-dpo",
        trains=("speech_decoder",),
        loss="dpo",
        requires=("tgt_units", "re_tgt_units"),
        lr=5e-4,
        warmup_ratio=0.3,
        epochs=3,
        note="CTC-DPO, beta 0.1; reference = the frozen stage-4 decoder, its log-likelihoods cached once",
    ),
)
# Not OpenOmni stages: what a model that does not start from a pretrained Qwen2.5 and Whisper needs
# first (the demo's tiny model; a new language). ``--all`` skips them.
LLM_PRETRAIN = Stage(
    index=0,
    name="llm-pretrain",
    trains=("llm",),
    loss="text",
    requires=(),
    lr=1e-3,
    warmup_ratio=0.05,
    epochs=1,
    note="text-only next-token training of the whole LLM",
)
SPEECH_PRETRAIN = Stage(
    index=0,
    name="speech-pretrain",
    trains=("speech", "speech_ctc_head"),
    loss="ctc",
    requires=("speech",),
    lr=2e-3,
    warmup_ratio=0.1,
    epochs=1,
    note="the speech encoder trained to read each clip's transcript (its last gpt turn) "
    "through a CTC head (OmniConfig.speech_ctc); the LLM is not run",
)
PRETRAINING = (LLM_PRETRAIN, SPEECH_PRETRAIN)
BY_NAME = {stage.name: stage for stage in PRETRAINING + STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(BY_NAME)}")
    return BY_NAME[name]
