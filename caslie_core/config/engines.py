"""Where a captioner or a judge runs (`engine:`): `hf`, the model inside our own actor or replica (transformers), or
`openai`, any OpenAI-compatible server a team already runs (vLLM, SGLang, Ray Serve LLM, `transformers serve`),
called over HTTP with the same prompts, votes, row accounting and CQE."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel


class OpenAIEndpoint(StrictModel):
    """An OpenAI-compatible chat-completions server for a captioner or a judge."""

    base_url: list[str] = Field(
        description="the server's base URL, e.g. http://vllm-captioner:8000/v1 (a list: requests spread round-robin)"
    )
    model: str | None = Field(None, description="the model id the server serves (default: the section's `model`)")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (the key is never in a config)"
    )
    max_concurrency: int = Field(16, ge=1, le=1024, description="requests one actor or replica keeps in flight")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(120.0, gt=0, description="seconds of silence while waiting for an answer")
    total_timeout: float = Field(
        300.0, gt=0, description="seconds per request from the first attempt to giving up (retries and waits included)"
    )
    retries: int = Field(3, ge=0, description="retries on connection errors, 429 and 5xx (Retry-After honoured)")
    backoff: float = Field(0.5, ge=0, description="first backoff in seconds; doubles per retry")
    max_tokens: int | None = Field(
        None, ge=1, description="per-request token cap (default: the section's max_new_tokens; a logits judge: 1)"
    )
    image_format: Literal["png", "jpeg"] = Field(
        "png", description="how a decoded, resized image is sent (a data: URL; never the original URL)"
    )
    logprobs: Literal["required", "fallback_to_generate"] = Field(
        "required",
        description="a logits judge reads the first token's top_logprobs; a server that returns none: `required` "
        "fails the job at start, `fallback_to_generate` judges by the generated answer instead (said once)",
    )
    structured_choice: bool = Field(
        False,
        description="a generate judge asks the server to answer exactly yes or no (vLLM/SGLang `structured_outputs: "
        "{choice: [yes, no]}` and `guided_choice`); only for servers that support it",
    )

    @field_validator("base_url", mode="before")
    @classmethod
    def _urls(cls, v):
        urls = [v] if isinstance(v, str) else v
        if not urls:
            raise ValueError("at least one base_url")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(f"base_url {u!r} must be an http(s) URL such as http://host:8000/v1")
        return [u.rstrip("/") for u in urls]


class EngineChoice(StrictModel):
    """`engine:` and its `openai:` endpoint, for a captioner or a judge section."""

    engine: Literal["hf", "openai"] = Field(
        "hf", description="hf: the model in this project's actors (transformers); openai: an OpenAI-compatible server"
    )
    openai: OpenAIEndpoint | None = Field(None, description="the server, when engine is openai")

    @model_validator(mode="after")
    def _endpoint(self):
        if self.engine == "openai" and self.openai is None:
            raise ValueError("engine: openai needs an `openai:` section with base_url (e.g. http://host:8000/v1)")
        if self.engine == "hf" and self.openai is not None:
            raise ValueError("an `openai:` section is set but engine is hf: set engine: openai, or remove it")
        return self
