"""Answering a prompt: text token by token from the LLM and, where the model speaks, speech units
from its speech decoder, streamed as they become final (``OmniModel`` takes these methods from
``OmniGeneration``, as ``transformers`` models take theirs from its ``GenerationMixin``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from omnifast.nn.kv_cache import forward_with_cache
from omnifast.ops.decode import sample_top_k_top_p


@dataclass
class AnswerEvent:
    """One step of a streamed answer: a text token as it is chosen, or the speech units that
    became final, with the seconds since the answer began."""

    kind: str  # "token" or "units"
    seconds: float
    token: Optional[int] = None
    units: List[int] = field(default_factory=list)


@dataclass
class GenerateOutput:
    text: str
    token_ids: List[int]
    units: List[int] = field(default_factory=list)
    first_token_s: Optional[float] = None
    first_unit_s: Optional[float] = None
    total_s: float = 0.0


class OmniGeneration:
    """Generation over an ``OmniModel``'s ``llm``, ``embed`` and ``speech_decoder``."""

    @property
    def streams_speech(self) -> bool:
        """Whether the speech decoder makes units while the text is written: a NAR decoder with
        causal attention and causal text fusion (OpenOmni's fusion sees all the text first)."""
        d = self.speech_decoder
        return d is not None and d.mode == "nar" and d.config.causal and d.config.fusion_causal

    @torch.no_grad()
    def stream_answer(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        speech_features=None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: Optional[int] = None,
        greedy: bool = True,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        speak: bool = False,
        unit_chunk: int = 4,
        generator: Optional[torch.Generator] = None,
        forced_tokens: Optional[List[int]] = None,
    ) -> Iterator[AnswerEvent]:
        """The answer to one prompt (input_ids (S,) or (1, S)) as it is made: an ``AnswerEvent``
        for each text token, and with ``speak=True`` events for the speech units: where the
        decoder streams (:attr:`streams_speech`) the units that became final every
        ``unit_chunk`` tokens, otherwise all of them once the text is done. The LLM and the
        speech decoder keep their KV caches. ``forced_tokens``: emit these tokens instead of
        choosing (the same work per token: for timing the speech path apart from what the model
        would write)."""
        from transformers.cache_utils import DynamicCache

        if speak and self.speech_decoder is None:
            raise ValueError("speak=True needs a model with a speech decoder")
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt, got a batch of {ids.shape[0]}")
        start = time.perf_counter()
        cache = DynamicCache(config=self.llm.config)
        embeds, visible = self.embed_visible(ids, pixel_values, speech_features)
        if visible is not None:  # the positions a compressing projector left blank are not seen
            embeds = embeds[:, visible[0]]
        hidden = forward_with_cache(self.llm.model, cache, inputs_embeds=embeds).last_hidden_state[:, -1]
        pending: List[tuple] = []
        streaming = speak and self.streams_speech
        stream = self.speech_decoder.stream(self._chunks(pending)) if streaming else None

        def spoken(final: bool):
            if not streaming:
                if final and pending:
                    states, tokens = next(self._chunks(pending))
                    yield AnswerEvent(
                        "units", time.perf_counter() - start, units=self.speech_decoder.generate(states, tokens)[0]
                    )
                return
            while pending and (final or len(pending) >= unit_chunk):
                units = next(stream)
                if units:
                    yield AnswerEvent("units", time.perf_counter() - start, units=units)

        for position in range(max_new_tokens if forced_tokens is None else len(forced_tokens)):
            logits = self.llm.lm_head(hidden)[0].float()
            if forced_tokens is not None:
                token = int(forced_tokens[position])
            else:
                token = (
                    int(logits.argmax()) if greedy else sample_top_k_top_p(logits, top_k, top_p, temperature, generator)
                )
            yield AnswerEvent("token", time.perf_counter() - start, token=token)
            step = torch.tensor([[token]], device=ids.device)
            hidden = forward_with_cache(self.llm.model, cache, input_ids=step).last_hidden_state[:, -1]
            if speak:  # the state of a response token is the one computed when it is the input
                pending.append((hidden[0], token))
                yield from spoken(final=False)
            if token == eos_token_id:
                break
        if speak:
            yield from spoken(final=True)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        speech_features=None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: Optional[int] = None,
        greedy: bool = True,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        speak: bool = False,
        unit_chunk: int = 4,
        tokenizer=None,
        generator: Optional[torch.Generator] = None,
        forced_tokens: Optional[List[int]] = None,
    ) -> GenerateOutput:
        """The whole of :meth:`stream_answer`: text, token ids, units and latencies."""
        start = time.perf_counter()
        out = GenerateOutput("", [])
        for event in self.stream_answer(
            input_ids,
            pixel_values,
            speech_features,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            greedy=greedy,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            speak=speak,
            unit_chunk=unit_chunk,
            generator=generator,
            forced_tokens=forced_tokens,
        ):
            if event.kind == "token":
                out.token_ids.append(event.token)
                out.first_token_s = event.seconds if out.first_token_s is None else out.first_token_s
            else:
                out.units += event.units
                out.first_unit_s = event.seconds if out.first_unit_s is None else out.first_unit_s
        out.total_s = time.perf_counter() - start
        if tokenizer is not None:
            out.text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return out

    @staticmethod
    def _chunks(pending: List[tuple]):
        """Hand the speech decoder what has accumulated, each time it asks."""
        while True:
            taken, pending[:] = pending[:], []
            yield (
                torch.stack([h for h, _ in taken])[None],
                torch.tensor([[t for _, t in taken]], device=taken[0][0].device),
            )
