"""Evaluation of each stage on held-out records: ASR character / word error rate (stage 1),
answer accuracy (stages 2-3), unit error rate of the decoder's units against the reference units
(stage 4), CTC-DPO's rewards on chosen / rejected pairs (stage 5, TRL's names) and the emotion
the generated speech is heard in (a vocoder and a style classifier). Error rates come from
``jiwer``."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch

from omnifast.models import OmniModel, OmniProcessor, response_states

from .data import Record
from .loader import ConversationDataset, collate_batch, load_audio, load_image
from .stages import get_stage


def _normalise(text: str) -> str:
    return re.sub(r"[^\w ]", "", text.lower()).strip()


@torch.no_grad()
def generate_answers(
    model: OmniModel, processor: OmniProcessor, records: Sequence[Record], max_new_tokens: int = 48
) -> List[str]:
    """Greedy answers to each record's conversation up to (not including) its last gpt turn."""

    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = []
    model.eval()
    for record in records:
        last = max(i for i, t in enumerate(record.conversations) if t["from"] == "gpt")
        prompt = record.conversations[:last]
        text = "".join(t["value"] for t in prompt)
        images = [load_image(p, record) for p in record.images][: text.count("<image>")]
        audios = [load_audio(p, record, processor.sampling_rate) for p in record.speech][: text.count("<speech>")]
        item = processor.encode_conversation(prompt, images, audios, add_generation_prompt=True)
        out = model.generate(
            item["input_ids"],
            item["pixel_values"],
            item["speech_features"],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            tokenizer=processor.tokenizer,
        )
        answers.append(out.text.strip())
    return answers


def references(records: Sequence[Record]) -> List[str]:
    return [[t["value"] for t in r.conversations if t["from"] == "gpt"][-1].strip() for r in records]


def asr_error_rates(model, processor, records) -> Dict[str, float]:
    import jiwer

    hyps, refs = generate_answers(model, processor, records), references(records)
    hyps = [h if h else "<empty>" for h in hyps]
    return {"cer": jiwer.cer(refs, hyps), "wer": jiwer.wer(refs, hyps)}


def answer_accuracy(model, processor, records) -> Dict[str, float]:
    hyps, refs = generate_answers(model, processor, records), references(records)
    correct = sum(_normalise(h) == _normalise(r) for h, r in zip(hyps, refs))
    return {"accuracy": correct / len(records)}


def _response_batches(model, processor, records, batch_size: int):
    """Batches of records with the LLM's states at their response positions."""
    dataset = ConversationDataset(records, processor)
    for start in range(0, len(dataset), batch_size):
        batch = collate_batch(
            [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], processor.tokenizer.pad_token_id
        )
        hidden = model(
            batch["input_ids"],
            batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            speech_features=batch["speech_features"],
            text_loss=False,
        ).hidden_states
        yield (batch, *response_states(hidden, batch["labels"]))


@torch.no_grad()
def unit_error_rate(model, processor, records, batch_size: int = 4) -> Dict[str, float]:
    """The decoder's greedy units on the LLM states of the reference answer, against its units."""
    import jiwer

    model.eval()
    hyps, refs = [], []
    for batch, states, tokens, mask in _response_batches(model, processor, records, batch_size):
        hyps += [" ".join(map(str, u)) or "<empty>" for u in model.speech_decoder.generate(states, tokens, mask, mask)]
        refs += [" ".join(map(str, row[row != -100].tolist())) for row in batch["units"]]
    return {"unit_error_rate": jiwer.wer(refs, hyps)}


@torch.no_grad()
def preference_metrics(
    model, processor, records, reference: Optional[OmniModel] = None, beta: float = 0.1, batch_size: int = 4
) -> Dict[str, float]:
    """TRL's DPO figures on held-out chosen / rejected pairs: ``rewards/chosen`` and
    ``rewards/rejected`` (beta x (log p - log p_ref), log-likelihoods summed over the units, means
    over the records), ``rewards/margins`` (their mean difference) and ``rewards/accuracies``
    (how often the chosen reward is the larger). Without a reference, log p_ref = 0."""
    model.eval()
    chosen_rewards, rejected_rewards = [], []
    for batch, states, tokens, mask in _response_batches(model, processor, records, batch_size):
        chosen, rejected = model.speech_decoder.reference_logps(
            states, tokens, batch["units"], batch["rejected_units"], hidden_mask=mask, text_mask=mask
        )
        if reference is not None:
            ref_c, ref_r = reference.speech_decoder.reference_logps(
                states, tokens, batch["units"], batch["rejected_units"], hidden_mask=mask, text_mask=mask
            )
            chosen, rejected = chosen - ref_c, rejected - ref_r
        chosen_rewards.append(beta * chosen.float())
        rejected_rewards.append(beta * rejected.float())
    chosen, rejected = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margins": float((chosen - rejected).mean()),
        "rewards/accuracies": float((chosen > rejected).float().mean()),
    }


def reward_accuracy(
    model, processor, records, reference: Optional[OmniModel] = None, batch_size: int = 4
) -> Dict[str, float]:
    """How often the policy's implicit reward prefers the chosen units: (log p_w - log ref_w) >
    (log p_l - log ref_l). Without a reference, how often log p_w > log p_l."""
    metrics = preference_metrics(model, processor, records, reference, batch_size=batch_size)
    return {"reward_accuracy": metrics["rewards/accuracies"]}


@torch.no_grad()
def response_units(model, processor, records, batch_size: int = 8) -> List[List[int]]:
    """The speech decoder's greedy units for each record's own responses (its gpt turns, the text
    teacher-forced as in training)."""
    model.eval()
    units: List[List[int]] = []
    for _, states, tokens, mask in _response_batches(model, processor, records, batch_size):
        units += model.speech_decoder.generate(states, tokens, mask, mask)
    return units


def response_text(record: Record) -> str:
    return " ".join(t["value"] for t in record.conversations if t["from"] == "gpt")


def emotion_accuracy(model, processor, records, vocoder, classifier, batch_size: int = 8) -> Dict[str, object]:
    """How often the speech the decoder makes for each record's responses (units -> ``vocoder``,
    judged by a :class:`~omnifast.speech.style.StyleClassifier`) is in the record's ``emotion``:
    the accuracy, its counts, and how many clips were heard as each style."""
    if any(r.emotion is None for r in records):
        raise ValueError("emotion_accuracy needs records with an emotion")
    waves = vocoder.synthesize_many(response_units(model, processor, records, batch_size))
    predicted = classifier.predict(waves, [response_text(r) for r in records])
    correct = sum(p == r.emotion for p, r in zip(predicted, records))
    return {
        "accuracy": correct / len(records),
        "correct": correct,
        "n": len(records),
        "predicted": {style: predicted.count(style) for style in classifier.styles},
        "waves": waves,
    }


UNITS = {
    "cer": "character errors per reference character (a fraction: 0.25 = 25%; above 1 when the "
    "answers are longer than the references)",
    "wer": "word errors per reference word (a fraction)",
    "accuracy": "share of answers equal to the reference after normalisation (a fraction)",
    "unit_error_rate": "unit errors per reference unit (a fraction)",
    "reward_accuracy": "share of pairs whose implicit reward prefers the chosen units (a fraction)",
    "rewards/accuracies": "share of pairs whose implicit reward prefers the chosen units (a fraction)",
    "rewards/margins": "mean of beta x (chosen - rejected) log-likelihood gains over the reference (nats)",
    "rewards/chosen": "mean of beta x the chosen units' log-likelihood gain over the reference (nats)",
    "rewards/rejected": "mean of beta x the rejected units' log-likelihood gain over the reference (nats)",
}


def describe(metrics: Dict[str, float]) -> str:
    """One line per metric with its unit."""
    return "\n".join(f"{name} = {value:.4f} ({UNITS.get(name, 'no unit')})" for name, value in metrics.items())


def evaluate(stage_name: str, model, processor, records, reference=None) -> Dict[str, float]:
    stage = get_stage(stage_name)
    if stage.index == 1:
        return asr_error_rates(model, processor, records)
    if stage.index in (0, 2, 3):
        return answer_accuracy(model, processor, records)
    if stage.index == 4:
        return unit_error_rate(model, processor, records)
    return preference_metrics(model, processor, records, reference)
