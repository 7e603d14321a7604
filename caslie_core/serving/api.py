"""The service's API without Ray: HTTP errors, request schemas, OpenAI-compatible shapes, API keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BASE_MODEL_NAME = "base"


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


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
        {"WWW-Authenticate": "Bearer"},
        code="invalid_api_key",
    )


def overloaded(why: str, retry_after_s: float) -> ApiError:
    """503 with Retry-After: the client should come back, nothing is wrong with its request."""
    return ApiError(
        503, f"overloaded: {why}; retry later", {"Retry-After": str(max(1, round(retry_after_s)))}, code="overloaded"
    )


def served_model(models: dict[str, str], name: str) -> tuple[str, str]:
    """(served name, multiplexed id) of a model a request names; 404 `model_not_found` otherwise."""
    if name not in models:
        raise ApiError(404, f"unknown model {name!r}; served: {sorted(models)}", code="model_not_found")
    return name, models[name]


def check_headers(raw_headers, limit: int) -> None:
    """431 when the request's headers (names and values) add up to more than `limit` bytes."""
    size = sum(len(k) + len(v) + 4 for k, v in raw_headers)
    if size > limit:
        raise ApiError(
            431, f"request headers of {size} bytes are over the {limit}-byte limit", code="headers_too_large"
        )


async def read_body(chunks, limit: int, declared_length: str = "") -> bytes:
    """Read a request body from an async iterator of chunks; 413 past `limit` bytes (declared or read)."""
    if declared_length.isdigit() and int(declared_length) > limit:
        raise ApiError(413, f"request body of {declared_length} bytes is over the {limit}-byte limit")
    parts, n = [], 0
    async for chunk in chunks:
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


def validation_detail(err: ValidationError) -> list[dict]:
    """Pydantic errors as FastAPI's 422 detail: [{loc: ["body", ...], msg, type}]."""
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]


MAX_JSON_DEPTH = 64  # a request nests far less; deeper ones are refused before anything walks them


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def json_depth(value) -> int:
    """How deep lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_body(raw: bytes, model: type[BaseModel]):
    """Bytes -> validated request, or ApiError(422) saying what is wrong and where. Strict JSON: no NaN or
    Infinity, integers of at most 4,300 digits, nesting at most `MAX_JSON_DEPTH` deep."""
    bad = None
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            422,
            [
                {
                    "loc": ["body", getattr(e, "pos", 0)],
                    "msg": f"malformed JSON: {getattr(e, 'msg', e)}",
                    "type": "json_invalid",
                }
            ],
        ) from None
    except RecursionError:
        bad = f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        bad = f"malformed JSON: {str(e)[:200]}"
    if bad is None and json_depth(data) > MAX_JSON_DEPTH:
        bad = f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    if bad is not None:
        raise ApiError(422, [{"loc": ["body"], "msg": bad, "type": "json_invalid"}])
    if not isinstance(data, dict):
        raise ApiError(422, [{"loc": ["body"], "msg": "expected a JSON object", "type": "dict_type"}])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e)) from None


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


class ChatPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict | str | None = None

    @field_validator("image_url")
    @classmethod
    def _url_is_text(cls, v):
        if isinstance(v, dict) and not isinstance(v.get("url"), str):
            raise ValueError("image_url.url must be a string (an http(s) URL or a data: URI)")
        return v

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
