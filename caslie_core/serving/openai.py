"""The OpenAI-compatible surface without Ray: chat and text completion requests, what is refused and why (400
naming the parameter, as OpenAI, vLLM and Ray Serve LLM answer), sampling, and the response, chunk and model
shapes the official clients parse.

Decoding: a request that sets no `temperature` (or 0) is answered greedily, the method's decoding (`/v1/predict`
always is); `temperature` > 0 samples, with `top_p` and `seed` (a seeded request draws the same answer again).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..models.sampling import Sampling
from .api import ApiError


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


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
    name: str | None = None

    @model_validator(mode="after")
    def _content(self):
        """Only an assistant's message may come without content (OpenAI and vLLM answer 400 otherwise)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class _Generation(BaseModel):
    """What chat and text completions share. Unknown fields are refused (OpenAI: 'Unrecognized request
    argument'), so a client never gets plain text back for a feature it asked for."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    timeout_s: float | None = Field(None, gt=0, description="ours: a deadline for this request")
    # accepted, no effect on a self-hosted model's answer
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def limit(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed, tuple(self.stop or ()))

    def refusals(self) -> list[tuple[bool, str, str]]:
        """(refused, parameter, why) of what this service cannot honour, in the order they are checked."""
        return [
            (self.n != 1, "n", f"one choice per request (got {self.n}); send the request again for another"),
            (bool(self.presence_penalty), "presence_penalty", "penalties are not supported"),
            (bool(self.frequency_penalty), "frequency_penalty", "penalties are not supported"),
            (bool(self.logit_bias), "logit_bias", "not supported"),
            (self.stream_options is not None and not self.stream, "stream_options", "only with stream: true"),
        ]

    def check_supported(self) -> None:
        """400 naming the first parameter this service cannot honour."""
        for refused, param, why in self.refusals():
            if refused:
                raise unsupported(param, why)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generation):
    """`POST /v1/chat/completions`: text and image_url parts; images are captioned in context (CASLIE)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refusals(self) -> list[tuple[bool, str, str]]:
        kind = (self.response_format or {}).get("type", "text")
        return [
            *super().refusals(),
            (bool(self.tools), "tools", "this model does not call tools"),
            (bool(self.functions), "functions", "this model does not call functions"),
            (self.tool_choice not in (None, "none"), "tool_choice", "this model does not call tools"),
            (self.function_call not in (None, "none"), "function_call", "this model does not call functions"),
            (kind != "text", "response_format", f"only type 'text' (got {kind!r})"),
            (bool(self.logprobs), "logprobs", "log probabilities are not returned"),
            (bool(self.top_logprobs), "top_logprobs", "log probabilities are not returned"),
            (bool(self.modalities) and set(self.modalities) != {"text"}, "modalities", "text only"),
            (self.reasoning_effort is not None, "reasoning_effort", "not a reasoning model"),
        ]


class CompletionRequest(_Generation):
    """`POST /v1/completions`: the prompt as it is (no template, no images), one string or a list."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("at least one prompt")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def refusals(self) -> list[tuple[bool, str, str]]:
        return [
            *super().refusals(),
            (self.echo, "echo", "not supported"),
            (bool(self.suffix), "suffix", "insertion is not supported"),
            (self.best_of not in (None, 1), "best_of", "one candidate per prompt"),
            (bool(self.logprobs), "logprobs", "log probabilities are not returned"),
            (self.stream and len(self.prompts()) > 1, "prompt", "stream one prompt per request"),
        ]


def request_sampling(req: _Generation) -> dict | None:
    """A request's decoding as the Predictor deployment takes it (None = greedy, the method's)."""
    s = req.sampling()
    if s.greedy and not s.stop:
        return None
    return {"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "stop": list(s.stop)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(prefix: str, obj: str, model: str) -> dict:
    """What every completion object and chunk starts with: a fresh id (`chatcmpl-...`, `cmpl-...`), its
    `object`, `created` and `model`."""
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()), "model": model}


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
        **envelope("chatcmpl", "chat.completion", model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        **({"caslie": extra} if extra else {}),
    }


def text_completion(model: str, answers: list[dict]) -> dict:
    """`answers`: per prompt {text, finish_reason, n_prompt_tokens, n_new_tokens}, in the request's order."""
    return {
        **envelope("cmpl", "text_completion", model),
        "choices": [
            {"index": i, "text": a["text"], "finish_reason": a["finish_reason"], "logprobs": None}
            for i, a in enumerate(answers)
        ],
        "usage": usage(sum(a["n_prompt_tokens"] for a in answers), sum(a["n_new_tokens"] for a in answers)),
    }


class Chunks:
    """The server-sent events of one streamed completion, chat (`chat.completion.chunk`, deltas) or text
    (`text_completion`, text pieces): content as it comes, the finish reason, the usage chunk when asked
    (`stream_options.include_usage`: `choices: []`, as OpenAI sends it), then `[DONE]`."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.chat = chat
        self.head = envelope(*(("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")), model)

    @staticmethod
    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def _choice(self, text: str | None, finish: str | None, *, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self.sse({**self.head, "choices": [choice]})

    def start(self) -> list[str]:
        return [self._choice(None, None, role=True)] if self.chat else []

    def content(self, text: str) -> str:
        return self._choice(text, None)

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, *, include_usage: bool) -> list[str]:
        events = [self._choice(None, reason)]
        if include_usage:
            events.append(self.sse({**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}))
        return [*events, "data: [DONE]\n\n"]

    def error(self, err: ApiError) -> list[str]:
        return [self.sse(err.openai_body()), "data: [DONE]\n\n"]


async def stream_events(chunks: Chunks, parts, *, include_usage: bool, deadline: float):
    """The events of a streamed answer from the Predictor's stream (`parts`: an async iterator of
    `{"delta"}`, `{"error"}`, then `{"done", ...}`, with a `cancel()`); cancelled when the events stop
    (the client went away) or `deadline` (time.monotonic()) passes."""
    import asyncio

    for event in chunks.start():
        yield event
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async for part in parts:
                if "delta" in part:
                    yield chunks.content(part["delta"])
                    continue
                if "error" in part:
                    events = chunks.error(ApiError(500, f"the model failed: {part['error']}", code="model_error"))
                else:
                    events = chunks.finish(
                        part["finish_reason"],
                        part["n_prompt_tokens"],
                        part["n_new_tokens"],
                        include_usage=include_usage,
                    )
                for event in events:
                    yield event
    except TimeoutError:
        for event in chunks.error(ApiError(504, "deadline passed while answering", code="timeout")):
            yield event
    finally:
        parts.cancel()


def model_card(model_id: str, *, parent: str | None = None, created: int | None = None) -> dict:
    """One entry of /v1/models: a base model is owned by its hub organisation, an adapter by us, with its base
    as `parent` and `root` (Ray Serve LLM's `base:adapter` ids)."""
    card = {
        "id": model_id,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": "caslie" if parent else (model_id.split("/", 1)[0] if "/" in model_id else "caslie"),
    }
    if parent:
        card.update(parent=parent, root=parent)
    return card


def models_list(cards: list[dict]) -> dict:
    return {"object": "list", "data": cards}
