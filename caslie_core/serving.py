"""What the online service does, without Ray: request schemas, image intake for clients, assembling
captions and votes into an answer, and the OpenAI-compatible shapes. `ray_jobs/serve.py` wraps this
in Serve deployments.

Image intake is strict because it runs on behalf of strangers: only the configured URL schemes (no
local files ever), `data:` URIs with a byte cap, the address rules of `caslie_core.images` (loopback,
private, link-local and metadata addresses refused, also after redirects and DNS), and the
decompression-bomb guard of `decode_image`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .enrichment import assemble
from .errors import ImageError, RecordError
from .images import FetchPolicy, decode_image, fetch_image
from .prompts import (
    caption_request,
    chat_caption_request,
    chat_judge_question,
    clean_caption,
    instruction_prompt,
    judge_question,
    keep_caption,
)
from .records import Record, parse_record

BASE_MODEL_NAME = "base"


# ---------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error with a status, a JSON-able detail and optional headers."""

    def __init__(self, status: int, detail: Any, headers: dict | None = None, *, code: str | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.code = code

    def openai_body(self) -> dict:
        msg = (
            self.detail
            if isinstance(self.detail, str)
            else "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in self.detail)
        )
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": msg, "type": kind, "param": None, "code": self.code or str(self.status)}}


def validation_detail(err: ValidationError) -> list[dict]:
    """Pydantic errors as FastAPI's 422 detail: [{loc: ["body", ...], msg, type}]."""
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]


def parse_body(raw: bytes, model: type[BaseModel]):
    """Bytes -> validated request, or ApiError(422) saying what is wrong and where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = getattr(e, "pos", 0)
        raise ApiError(
            422, [{"loc": ["body", pos], "msg": f"malformed JSON: {getattr(e, 'msg', e)}", "type": "json_invalid"}]
        ) from None
    if not isinstance(data, dict):
        raise ApiError(422, [{"loc": ["body"], "msg": "expected a JSON object", "type": "dict_type"}])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e)) from None


# -------------------------------------------------------------------------------------- requests


class EnrichRequest(BaseModel):
    """One product record in the MMECInstruct schema; `input`/`options` as JSON strings or values."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="your id, echoed back (default: a content hash)")
    task: str = Field(description="task name or abbreviation (AP, CC, PRP, PSI, MPC, SA, SR)")
    instruction: str = Field(min_length=1, description="the task instruction")
    input: str | dict | list = Field(description="the task input (JSON string as in the dataset, or a value)")
    options: str | list[str] | None = Field(None, description="answer options (JSON string or list)")
    images: list[str] = Field(description="image URLs (http/https) or data: URIs, in the task's image order")
    image_errors: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: an image that cannot be read fails the request (422/502); skip: answer "
        "without its caption, as the batch job does (status partial)",
    )
    timeout_s: float | None = Field(None, gt=0, description="deadline for this request (capped by the server)")


class PredictRequest(EnrichRequest):
    adapter: str | None = Field(None, description="model (adapter) name from /v1/models; default: the main one")


def to_record(req: EnrichRequest) -> Record:
    raw = req.model_dump(include={"id", "task", "instruction", "input", "options", "images"}, exclude_none=True)
    try:
        return parse_record(raw)
    except RecordError as e:
        loc = ["body", e.field] if e.field else ["body"]
        raise ApiError(422, [{"loc": loc, "msg": e.reason, "type": "value_error"}]) from None


# ---------------------------------------------------------------------------------------- images


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


def load_image(url: str, policy: FetchPolicy, *, size: int, max_pixels: int):
    """A client's image URL or data: URI -> `size x size` RGB array. Raises ImageError (fetch or decode)."""
    if url[:5].lower() == "data:":
        data = read_data_uri(url, policy.max_bytes)
    else:
        data = fetch_image(url, policy)
    return decode_image(data, max_pixels=max_pixels, size=size)


def shown_url(url: str) -> str:
    """URLs as echoed in responses: data: URIs are not sent back whole."""
    if url[:5].lower() == "data:":
        return f"{url.partition(',')[0]},... ({len(url)} chars)"
    return url


def image_failure_status(err: ImageError) -> int:
    """422 for what the client can fix (refused, not an image, too big); 502 when the image host failed."""
    return 502 if getattr(err, "transient", False) else 422


# ------------------------------------------------------------------------------------ assembling


@dataclass
class ImageSlot:
    """One image of a request as it moves through the stages."""

    index: int
    url: str
    prompt: str = ""
    pixels: Any = None
    caption: str | None = None
    votes: dict[str, str | None] = field(default_factory=dict)
    error: dict | None = None

    @property
    def kept(self) -> bool:
        return keep_caption(self.caption, self.error, list(self.votes.values()))

    def report(self) -> dict:
        return {
            "index": self.index,
            "url": shown_url(self.url),
            "caption": self.caption,
            "votes": self.votes,
            "kept": self.kept,
            "error": self.error,
        }


def record_slots(record: Record) -> list[ImageSlot]:
    return [ImageSlot(i, u, caption_request(record, i)) for i, u in enumerate(record.images)]


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


# ------------------------------------------------------------------------------------------ chat


class ChatPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict | str | None = None

    def url(self) -> str | None:
        if self.image_url is None:
            return None
        return self.image_url if isinstance(self.image_url, str) else self.image_url.get("url")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatPart] | None = None


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request (the fields that apply; other sampling fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice (greedy decoding)")
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0)


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


def chat_slots(text: str, urls: list[str]) -> list[ImageSlot]:
    return [ImageSlot(i, u, chat_caption_request(text)) for i, u in enumerate(urls)]


def chat_questions(text: str, slots: list[ImageSlot]) -> dict[int, str]:
    return {s.index: chat_judge_question(text, s.caption) for s in slots if s.caption is not None}


def chat_prompt(text: str, slots: list[ImageSlot], *, style: str) -> str:
    """The instruction prompt for a chat: the user's words as the instruction, kept captions as the input."""
    kept = [s.caption for s in slots if s.kept]
    key = "product information extracted from image"
    value = {key: kept[0]} if len(kept) == 1 else ({key: kept} if kept else {})
    return instruction_prompt(text, value, [], style=style)


def chat_completion(
    model: str,
    content: str,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str = "stop",
    extra: dict | None = None,
) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        **({"caslie": extra} if extra else {}),
    }


def chat_chunks(completion: dict) -> list[str]:
    """A finished completion as server-sent events: role, the whole content in one delta, stop, [DONE]."""
    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
    }
    choice = completion["choices"][0]
    deltas = [{"role": "assistant", "content": ""}, {"content": choice["message"]["content"]}, {}]
    events = []
    for i, delta in enumerate(deltas):
        finish = choice["finish_reason"] if i == len(deltas) - 1 else None
        events.append(
            json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})
        )
    return [f"data: {e}\n\n" for e in events] + ["data: [DONE]\n\n"]


def models_list(names: list[str], *, owner: str = "caslie") -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": owner} for n in names]}


# ------------------------------------------------------------------------------------------ auth


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(headers, digest: str | None) -> bool:
    """`Authorization: Bearer KEY` or `X-API-Key: KEY` against the configured key's digest (constant time);
    `headers` maps lower-case names (a dict) or is case-insensitive (Starlette). No digest = no auth."""
    if digest is None:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return bool(given) and hmac.compare_digest(key_digest(given), digest)


__all__ = [
    "ApiError",
    "BASE_MODEL_NAME",
    "ChatRequest",
    "EnrichRequest",
    "ImageSlot",
    "PredictRequest",
    "caption_outcome",
    "chat_chunks",
    "chat_completion",
    "chat_prompt",
    "chat_questions",
    "chat_request_text",
    "chat_slots",
    "enriched",
    "image_failure_status",
    "key_digest",
    "key_matches",
    "load_image",
    "models_list",
    "parse_body",
    "read_data_uri",
    "record_questions",
    "record_slots",
    "shown_url",
    "to_record",
    "validation_detail",
]
