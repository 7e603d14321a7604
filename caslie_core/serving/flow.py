"""The request flow of the online service, without Serve: a client's record or chat becomes image slots,
images are read (SSRF-safe, byte and pixel caps), captions and votes land on the slots, and the kept
captions are written into the text the model answers.

Image intake is strict because it runs on behalf of strangers: only the configured URL schemes (no
local files ever), `data:` URIs with a byte cap, the address rules of `caslie_core.images` (loopback,
private, link-local and metadata addresses refused, also after redirects and DNS), and the
decompression-bomb guard of `decode_image`; `intake.ImageIntake` reads them in the service's own pools.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ..enrichment.assemble import SINGLE_KEY, assemble
from ..errors import ImageError, RecordError
from ..items import ImageSlot, shown_url  # noqa: F401 - shown_url is part of this module's surface
from ..prompts import (
    caption_request,
    chat_caption_request,
    chat_judge_question,
    clean_caption,
    instruction_prompt,
    judge_question,
)
from ..records import Record, parse_record
from .api import ApiError, EnrichRequest
from .openai import ChatPart, ChatRequest


def to_record(req: EnrichRequest) -> Record:
    raw = req.model_dump(include={"id", "task", "instruction", "input", "options", "images"}, exclude_none=True)
    try:
        return parse_record(raw)
    except RecordError as e:
        loc = ["body", e.field] if e.field else ["body"]
        raise ApiError(422, [{"loc": loc, "msg": e.reason, "type": "value_error"}]) from None


def read_data_uri(uri: str, max_bytes: int) -> bytes:
    """`data:[<mediatype>][;base64],<data>` -> bytes, with a byte cap checked before decoding."""
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("fetch", "malformed data: URI (no comma)")
    is_b64 = head.lower().endswith(";base64")
    if (len(payload) * 3 // 4 if is_b64 else len(payload)) > max_bytes + 3:
        raise ImageError("fetch", f"image exceeds the {max_bytes}-byte cap")
    try:
        data = base64.b64decode(payload, validate=True) if is_b64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise ImageError("fetch", f"malformed base64 in data: URI ({e})") from None
    if len(data) > max_bytes:
        raise ImageError("fetch", f"image exceeds the {max_bytes}-byte cap")
    return data


def image_failure_status(err: ImageError) -> int:
    """422 for what the client can fix (refused, not an image, too big); 502 when the image host failed."""
    return 502 if getattr(err, "transient", False) else 422


def record_slots(record: Record, rule: str = "strict") -> list[ImageSlot]:
    """The record's images, kept under the vote `rule` (`cqe.vote`)."""
    return [ImageSlot(i, u, caption_request(record, i), rule=rule) for i, u in enumerate(record.images)]


def record_questions(record: Record, slots: list[ImageSlot]) -> dict[int, str]:
    """Judge question per captioned image."""
    return {s.index: judge_question(record, s.index, s.caption) for s in slots if s.caption is not None}


def caption_outcome(slot: ImageSlot, result: dict) -> None:
    """Apply a captioner reply {caption, error} to a slot (empty captions count as no caption)."""
    if result.get("error"):
        slot.error = {"stage": "caption", "message": result["error"]}
    else:
        slot.caption = clean_caption(result.get("caption"))


def enriched(record: Record, slots: list[ImageSlot]) -> dict:
    """The record's enriched input and options (kept captions written in) plus the per-image report."""
    text = assemble(record, [s.caption for s in slots], [s.kept for s in slots])
    failed = sum(s.error is not None for s in slots)
    return {
        "status": "partial" if failed else "ok",
        "input": text.input,
        "options": text.options,
        "images": [s.report() for s in slots],
        "n_kept": sum(s.kept for s in slots),
        "n_failed_images": failed,
    }


def chat_request_text(req: ChatRequest) -> tuple[str, list[str]]:
    """(the conversation as one instruction text, the image URLs of the user's messages, in order)."""
    lines, urls = [], []
    last_user = (
        max(i for i, m in enumerate(req.messages) if m.role == "user")
        if any(m.role == "user" for m in req.messages)
        else None
    )
    if last_user is None:
        raise ApiError(422, [{"loc": ["body", "messages"], "msg": "no user message", "type": "value_error"}])
    for i, m in enumerate(req.messages):
        parts = [ChatPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        text = " ".join(p.text for p in parts if p.type == "text" and p.text)
        if m.role == "user":
            urls.extend(u for p in parts if p.type == "image_url" and (u := p.url()))
        if text:
            lines.append(text if i == last_user else f"{m.role}: {text}")
    return "\n".join(lines), urls


def chat_slots(text: str, urls: list[str], rule: str = "strict") -> list[ImageSlot]:
    return [ImageSlot(i, u, chat_caption_request(text), rule=rule) for i, u in enumerate(urls)]


def chat_questions(text: str, slots: list[ImageSlot]) -> dict[int, str]:
    return {s.index: chat_judge_question(text, s.caption) for s in slots if s.caption is not None}


def chat_prompt(text: str, slots: list[ImageSlot], *, style: str) -> str:
    """The instruction prompt for a chat: the user's words as the instruction, kept captions as the input."""
    kept = [s.caption for s in slots if s.kept]
    value = {SINGLE_KEY: kept[0]} if len(kept) == 1 else ({SINGLE_KEY: kept} if kept else {})
    return instruction_prompt(text, value, [], style=style)


def check_image_count(slots: list[ImageSlot], cap: int) -> None:
    if len(slots) > cap:
        raise ApiError(
            422, [{"loc": ["body", "images"], "msg": f"{len(slots)} images; at most {cap}", "type": "too_long"}]
        )


def image_failures_error(failures: list[tuple[ImageSlot, ImageError]]) -> ApiError:
    """Images that could not be read, as one error (422 if the client can fix any of them, else 502)."""
    return ApiError(
        min(image_failure_status(e) for _, e in failures),
        [
            {"loc": ["body", "images", s.index], "msg": f"{e.stage}: {e.reason}", "type": f"image_{e.stage}_error"}
            for s, e in sorted(failures, key=lambda f: f[0].index)
        ],
    )


def record_prompt_text(record: Record, out: dict, *, style: str) -> str:
    """The instruction prompt of an enriched record (`out` from `enriched`)."""
    return instruction_prompt(record.instruction, out["input"], out["options"], style=style)


def record_prompt(record: Record, slots: list[ImageSlot], *, style: str) -> str:
    """The instruction prompt of a record whose images are captioned and judged (`slots`)."""
    return record_prompt_text(record, enriched(record, slots), style=style)


def predict_response(record: Record, model: str, out: dict, ans: dict, timings: dict) -> dict:
    """The /v1/predict body: the answer (checked by the caller: a failed one is a 500 before it gets here), whether
    it is a valid label, the enrichment report, usage, timings."""
    return {
        "id": record.id,
        "task": record.task,
        "model": model,
        "answer": ans["text"],
        "valid": ans["text"] in record.labels,
        "raw_output": ans["raw"],
        **out,
        "usage": {"prompt_tokens": ans["n_prompt_tokens"], "completion_tokens": ans["n_new_tokens"]},
        "timings_ms": timings,
    }


@dataclass
class RecordSubject:
    """What a /v1/enrich or /v1/predict request is about: a record. Data, not code, so it may travel to a model
    replica (the co-located layouts caption, judge and answer in one call there)."""

    record: Record
    style: str = "alpaca"

    def slots(self, rule: str) -> list[ImageSlot]:
        return record_slots(self.record, rule)

    def questions(self, slots: list[ImageSlot]) -> dict[int, str]:
        return record_questions(self.record, slots)

    def prompt(self, slots: list[ImageSlot]) -> str:
        return record_prompt(self.record, slots, style=self.style)


@dataclass
class ChatSubject:
    """What a chat completion is about: the conversation as one instruction text, its images as slots."""

    text: str
    urls: list[str]
    style: str = "alpaca"

    def slots(self, rule: str) -> list[ImageSlot]:
        return chat_slots(self.text, self.urls, rule)

    def questions(self, slots: list[ImageSlot]) -> dict[int, str]:
        return chat_questions(self.text, slots)

    def prompt(self, slots: list[ImageSlot]) -> str:
        return chat_prompt(self.text, slots, style=self.style)


Subject = RecordSubject | ChatSubject


async def caption_and_judge(slots: list[ImageSlot], subject: Subject, captions, votes, stage=None) -> dict:
    """A request's images captioned, then judged, in place; seconds per stage. `captions(pixels, prompts)` answers
    one {caption, error} per image; `votes(questions)` one {judge: {vote, error}} per question (every judge's,
    `engine.merge_votes`); the questions are the subject's (a record's or a chat's). Which images are judged and
    what a vote or a judge's error does are the batch job's rules (`ImageSlot.judged`, `ImageSlot.take_vote`),
    under the slots' vote rule (`cqe.vote`: research judges a missing caption as "NA"). `stage` (an
    `engine.Stage`) says which step a passed deadline hit."""
    import time

    t = time.perf_counter()
    if stage is not None:
        stage.name = "captioning"
    live = [s for s in slots if s.error is None]
    if live:
        for slot, out in zip(live, await captions([s.pixels for s in live], [s.prompt for s in live])):
            caption_outcome(slot, out)
            slot.pixels = None
    times = {"caption": time.perf_counter() - t}
    t = time.perf_counter()
    if stage is not None:
        stage.name = "judging captions"
    research = bool(slots) and slots[0].rule == "research"
    questions = subject.questions([s for s in slots if s.judged(research)])
    if questions:
        by_index = {s.index: s for s in slots}
        for index, replies in zip(questions, await votes(list(questions.values()))):
            for judge, reply in replies.items():
                by_index[index].take_vote(judge, reply["vote"], reply.get("error"))
    times["judge"] = time.perf_counter() - t
    return times
