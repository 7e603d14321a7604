"""What each route of the service does, without Ray or HTTP: plain functions over a `Service` (an engine, the image
intake, the served model ids). The ingress (`ray_jobs/serve.py`) keeps what is HTTP: keys, body limits, the
deadline, disconnects, status codes; it calls one of these with the parsed request and a `Stage`.

A request's path (every layout alike): the model id resolved (`ServedModels`), the record or chat made a subject
with image slots (`flow.RecordSubject`, `flow.ChatSubject`), its images read (`ImageIntake`), then the engine
captions and judges them (`Engine.enrich`) and answers (`Engine.enrich_and_answer`, or `Engine.stream`), and the
response is shaped (`flow.enriched`, `flow.predict_response`, `openai.chat_completion`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..items import ImageSlot
from .api import ApiError, EnrichRequest, PredictRequest
from .catalog import ServedModels
from .engine import Decoding, Engine, Stage
from .flow import (
    ChatSubject,
    RecordSubject,
    chat_request_text,
    check_image_count,
    enriched,
    image_failures_error,
    predict_response,
    to_record,
)
from .intake import ImageIntake
from .openai import (
    ChatRequest,
    Chunks,
    CompletionRequest,
    chat_completion,
    models_list,
    request_sampling,
    stream_events,
    text_completion,
)


def _ignore(stage: str, seconds: float) -> None:
    pass


@dataclass
class Service:
    """What the routes run on. `rule`: the CQE vote rule (`cqe.vote`); `observe(stage, seconds)`: the stage
    histogram; `on_images(slots)`: a request's images once captioned and judged (the images-by-outcome count)."""

    engine: Engine
    intake: ImageIntake
    catalog: ServedModels
    style: str
    rule: str = "strict"
    max_images: int = 16
    observe: Callable[[str, float], None] = field(default=_ignore)
    on_images: Callable[[list[ImageSlot]], None] = field(default=lambda slots: None)

    async def model_id(self, name: str | None) -> tuple[str, str]:
        """(listed id, multiplexed id); with an adapter store it may list the store, so off the event loop."""
        if self.catalog.store:
            return await asyncio.to_thread(self.catalog.resolve, name)
        return self.catalog.resolve(name)

    def timed(self, times: dict, timings: dict, slots: list[ImageSlot] | None = None) -> None:
        """Stage seconds into a response's `timings_ms` and the stage histogram; `slots`: the request's images,
        done (counted by outcome)."""
        if slots:
            self.on_images(slots)
        for name, seconds in times.items():
            timings[name] = round(seconds * 1000, 1)
            self.observe(name, seconds)


class Events:
    """A streamed answer's server-sent events (the ingress sends them as `text/event-stream`)."""

    def __init__(self, events) -> None:
        self.events = events


def checked(answer: dict) -> dict:
    """An answer the model failed on is a 500 (the client's request was fine)."""
    if answer["error"]:
        raise ApiError(500, f"the model failed: {answer['error']}", code="model_error")
    return answer


async def load_images(svc: Service, slots: list[ImageSlot], mode: str, stage: Stage) -> None:
    """The slots' images fetched and decoded; `mode` fail: one that cannot be read fails the request."""
    stage.name = "fetching images"
    check_image_count(slots, svc.max_images)
    failures = await svc.intake.load(slots, deadline=stage.deadline)
    if failures and mode == "fail":
        raise image_failures_error(failures)


async def _record(svc: Service, req: EnrichRequest, stage: Stage, timings: dict):
    stage.name = "validating the record"
    subject = RecordSubject(to_record(req), svc.style)
    slots = subject.slots(svc.rule)
    t = time.perf_counter()
    await load_images(svc, slots, req.image_errors, stage)
    svc.timed({"fetch": time.perf_counter() - t}, timings)
    return subject, slots


async def enrich(svc: Service, req: EnrichRequest, stage: Stage) -> dict:
    t0, timings = time.perf_counter(), {}
    subject, slots = await _record(svc, req, stage, timings)
    slots, times = await svc.engine.enrich(subject, slots, stage)
    svc.timed(times, timings, slots)
    timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
    record = subject.record
    return {"id": record.id, "task": record.task, **enriched(record, slots), "timings_ms": timings}


async def predict(svc: Service, req: PredictRequest, stage: Stage) -> dict:
    t0, timings = time.perf_counter(), {}
    name, model_id = await svc.model_id(req.adapter)
    subject, slots = await _record(svc, req, stage, timings)
    slots, answer, times = await svc.engine.enrich_and_answer(subject, slots, Decoding(model_id), stage)
    svc.timed(times, timings, slots)
    timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
    record = subject.record
    return predict_response(record, name, enriched(record, slots), checked(answer), timings)


def _events(svc: Service, chunks: Chunks, prompt: str, decoding: Decoding, req, stage: Stage) -> Events:
    stage.name = "answering"
    parts = svc.engine.stream(prompt, decoding)
    return Events(stream_events(chunks, parts, include_usage=req.include_usage, deadline=stage.deadline))


async def chat(svc: Service, req: ChatRequest, stage: Stage) -> dict | Events:
    """The chat as one prompt: its images fetched, captioned in context and judged (CASLIE), kept captions in."""
    req.check_supported()
    name, model_id = await svc.model_id(req.model)
    subject = ChatSubject(*chat_request_text(req), svc.style)
    slots = subject.slots(svc.rule)
    await load_images(svc, slots, "fail", stage)
    decoding = Decoding(model_id, req.limit(), request_sampling(req))
    if req.stream:
        slots, times = await svc.engine.enrich(subject, slots, stage)
        svc.timed(times, {}, slots)
        return _events(svc, Chunks(name, chat=True), subject.prompt(slots), decoding, req, stage)
    slots, answer, times = await svc.engine.enrich_and_answer(subject, slots, decoding, stage)
    svc.timed(times, {}, slots)
    answer = checked(answer)
    return chat_completion(
        name,
        answer["text"],
        prompt_tokens=answer["n_prompt_tokens"],
        completion_tokens=answer["n_new_tokens"],
        finish_reason=answer["finish_reason"],
        extra={"images": [s.report() for s in slots]},
    )


async def completions(svc: Service, req: CompletionRequest, stage: Stage) -> dict | Events:
    """The prompt as it is (the model's own template, no images), one string or a list (a choice each)."""
    req.check_supported()
    name, model_id = await svc.model_id(req.model)
    decoding = Decoding(model_id, req.limit(), request_sampling(req))
    if req.stream:
        return _events(svc, Chunks(name, chat=False), req.prompts()[0], decoding, req, stage)
    stage.name = "answering"
    answers = await asyncio.gather(*(svc.engine.answer(p, decoding) for p in req.prompts()))
    return text_completion(name, [checked(a) for a in answers])


async def models(svc: Service) -> dict:
    return await asyncio.to_thread(lambda: models_list(svc.catalog.cards()))


async def model(svc: Service, model_id: str) -> dict:
    return await asyncio.to_thread(svc.catalog.card, model_id)
