"""What the service's routes need from the models, whatever runs them: the engine protocol.

An engine captions images (`captions`), asks every judge about captions (`votes`, each judge's vote with its error),
answers a prompt (`answer`) or streams the answer (`stream`), and reports its models' health (`health`). The routes
(`routes.py`) are written against it alone; `ray_jobs/serve_engines.py` has one engine per layout (split: a
deployment per model; colocated: one Models deployment; single: the models in the ingress's own replica), and the
tests drive the routes with an engine of their own, without Ray.

`PipelineEngine` gives `enrich` (caption, then judge: `flow.caption_and_judge`, the batch job's rules) and
`enrich_and_answer` from the four calls; an engine whose models share a process overrides them to make one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..items import ImageSlot
from .flow import Subject, caption_and_judge


@dataclass(frozen=True)
class Decoding:
    """How one answer is decoded: the model (an adapter's multiplexed id, or `api.BASE_MODEL_NAME`), the client's
    token cap (None = the configured one; never above it) and sampling (None = greedy, the method's)."""

    model: str
    limit: int | None = None
    sampling: dict | None = None


class Stage:
    """Where a request is (what a passed deadline reports) and when its deadline is (`time.monotonic()`)."""

    def __init__(self, name: str, deadline: float) -> None:
        self.name, self.deadline = name, deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class Engine(Protocol):
    async def captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        """One {caption, error} per image."""

    async def votes(self, questions: list[str]) -> list[dict]:
        """One {judge: {vote, error}} per question: every judge of the panel."""

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        """A `models.predictor.Answer` as a dict (text, error, tokens, raw, finish_reason)."""

    def stream(self, prompt: str, decoding: Decoding) -> Any:
        """An async iterator of {delta} ... {done, finish_reason, tokens} (or {error}) with `cancel()`."""

    async def enrich(self, subject: Subject, slots: list[ImageSlot], stage: Stage) -> tuple[list[ImageSlot], dict]:
        """The slots captioned and judged (a new list when they travelled), seconds per stage."""

    async def enrich_and_answer(
        self, subject: Subject, slots: list[ImageSlot], decoding: Decoding, stage: Stage
    ) -> tuple[list[ImageSlot], dict, dict]:
        """`enrich`, then the subject's prompt answered: slots, answer, seconds per stage."""

    async def health(self) -> dict[str, str]:
        """Each model deployment (or part) and "ok" or what is wrong."""


def merge_votes(replies: list[list[dict]]) -> list[dict]:
    """Several judges' (or panels') answers to the same questions, one {judge: {vote, error}} per question."""
    return [{k: v for reply in replies for k, v in reply[i].items()} for i in range(len(replies[0]) if replies else 0)]


class PipelineEngine:
    """`enrich` and `enrich_and_answer` made of the engine's own `captions`, `votes` and `answer`."""

    async def enrich(self, subject: Subject, slots: list[ImageSlot], stage: Stage | None = None):
        if not slots:  # a text-only chat: nothing to caption or judge
            return slots, {}
        return slots, await caption_and_judge(slots, subject, self.captions, self.votes, stage)

    async def enrich_and_answer(self, subject: Subject, slots: list[ImageSlot], decoding: Decoding, stage=None):
        slots, times = await self.enrich(subject, slots, stage)
        if stage is not None:
            stage.name = "answering"
        t = time.perf_counter()
        answer = await self.answer(subject.prompt(slots), decoding)
        times["predict"] = time.perf_counter() - t
        return slots, answer, times


class Stream:
    """An async generator of answer events, with `cancel()` (a client that went away): closing it ends its row of
    the generation at the next token. What an in-process engine returns where a Serve handle returns its own
    streaming response."""

    def __init__(self, events) -> None:
        self.events = events

    def __aiter__(self):
        return self._run()

    async def _run(self):
        async with contextlib.aclosing(self.events) as events:
            async for event in events:
                yield event

    def cancel(self) -> None:
        asyncio.ensure_future(self.events.aclose())
