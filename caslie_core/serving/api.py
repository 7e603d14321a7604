"""The service's own HTTP surface without Ray: errors (with OpenAI's error object), strict JSON bodies and their
limits, the /v1/enrich and /v1/predict request schemas, API keys. The OpenAI requests and responses: `openai.py`."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

BASE_MODEL_NAME = "base"  # the multiplexed id of the base model alone (no adapter)


class ApiError(Exception):
    """An HTTP error with a status, a JSON-able detail and optional headers."""

    def __init__(
        self,
        status: int,
        detail: Any,
        headers: dict | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.code = code
        self.param = param

    def body(self, openai: bool) -> dict:
        """The response body: OpenAI's error object on the OpenAI routes, FastAPI's `{"detail": ...}` on ours."""
        return self.openai_body() if openai else {"detail": self.detail}

    def status_for(self, openai: bool) -> int:
        return self.openai_status() if openai else self.status

    def openai_status(self) -> int:
        """On the OpenAI routes an invalid request is 400 (our own routes keep FastAPI's 422)."""
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict:
        """OpenAI's error object: message, type, param (the request field at fault, as `messages[0].role`), code."""
        param = self.param
        if isinstance(self.detail, str):
            msg = self.detail
        else:
            msg = "; ".join(_openai_message(d) for d in self.detail)
            # the most specific location (a union field reports each branch: the deepest is the one meant)
            deepest = max(self.detail, key=lambda d: len(d.get("loc", [])), default={})
            param = param or _param_path(deepest.get("loc", [])[1:])
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        code = self.code or ("invalid_value" if self.status in (400, 422) else str(self.status))
        return {"error": {"message": msg, "type": kind, "param": param, "code": code}}


def _param_path(loc) -> str | None:
    """A validation error's location as OpenAI writes a param: `messages[0].content[1].image_url`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("str", "list[", "dict[", "function-")):  # pydantic's union-branch labels
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _openai_message(d: dict) -> str:
    where = _param_path(d.get("loc", [])[1:])
    if d.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}"
    return f"{where}: {d.get('msg')}" if where else str(d.get("msg"))


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


def model_not_found(name: str, served) -> ApiError:
    return ApiError(
        404,
        f"The model {name!r} does not exist; served: {sorted(served)}",
        code="model_not_found",
        param="model",
    )


def check_headers(raw_headers, limit: int) -> None:
    """431 when the request's headers (names and values) add up to more than `limit` bytes."""
    size = sum(len(k) + len(v) + 4 for k, v in raw_headers)
    if size > limit:
        raise ApiError(
            431, f"request headers of {size} bytes are over the {limit}-byte limit", code="headers_too_large"
        )


async def read_body(chunks, limit: int, declared_length: str = "", seconds: float | None = None) -> bytes:
    """Read a request body from an async iterator of chunks; 413 past `limit` bytes (declared or read), 408 when it
    has not all arrived within `seconds` (the connection is then closed)."""
    if seconds is not None:
        import asyncio

        try:
            return await asyncio.wait_for(read_body(chunks, limit, declared_length), seconds)
        except TimeoutError:
            why = f"the request body did not arrive within {seconds:g}s"
            raise ApiError(408, why, {"Connection": "close"}, code="timeout") from None
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
