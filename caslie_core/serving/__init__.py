"""The online service without Ray or HTTP.

- `api`: HTTP errors, the /v1/enrich and /v1/predict request schemas, API keys, strict JSON bodies;
- `openai`: the OpenAI-compatible requests (what is refused and why), responses, chunks and model cards;
- `flow`: a record or a chat as a subject with image slots, and the caption-and-vote step (the batch job's rule);
- `intake`: a request's images read in the service's own thread pools (SSRF-safe);
- `engine`: what the routes need from the models (captions, votes with their errors, answers, streams);
- `routes`: what each route does, as plain functions over a `routes.Service` (an engine, the intake, the ids);
- `replica`: the model parts of one replica (batched; the health rule) and `LocalEngine` over them;
- `gather`: the batcher; `catalog`: the model ids clients name; `spec`: what is resolved when the app is built.

`ray_jobs/serve.py` puts the routes behind Ray Serve's HTTP ingress; `ray_jobs/serve_engines.py` has an engine per
layout, `ray_jobs/serve_models.py` the model deployments."""

from __future__ import annotations

from .api import (
    BASE_MODEL_NAME,
    ApiError,
    EnrichRequest,
    PredictRequest,
    check_headers,
    key_digest,
    key_matches,
    model_not_found,
    overloaded,
    parse_body,
    read_body,
    unauthorized,
    validation_detail,
)
from .catalog import ServedModels
from .flow import (
    ImageSlot,
    caption_and_judge,
    caption_outcome,
    chat_prompt,
    chat_questions,
    chat_request_text,
    chat_slots,
    check_image_count,
    enriched,
    image_failure_status,
    image_failures_error,
    predict_response,
    read_data_uri,
    record_prompt,
    record_prompt_text,
    record_questions,
    record_slots,
    shown_url,
    to_record,
)
from .intake import ImageIntake
from .openai import (
    ChatMessage,
    ChatPart,
    ChatRequest,
    Chunks,
    CompletionRequest,
    chat_completion,
    model_card,
    models_list,
    request_sampling,
    stream_events,
    text_completion,
)

__all__ = [
    "BASE_MODEL_NAME",
    "ApiError",
    "ChatMessage",
    "ChatPart",
    "ChatRequest",
    "EnrichRequest",
    "ImageSlot",
    "PredictRequest",
    "caption_and_judge",
    "caption_outcome",
    "ImageIntake",
    "Chunks",
    "CompletionRequest",
    "ServedModels",
    "model_card",
    "model_not_found",
    "text_completion",
    "stream_events",
    "request_sampling",
    "check_headers",
    "chat_completion",
    "chat_prompt",
    "chat_questions",
    "chat_request_text",
    "chat_slots",
    "enriched",
    "image_failure_status",
    "key_digest",
    "key_matches",
    "models_list",
    "parse_body",
    "overloaded",
    "unauthorized",
    "predict_response",
    "read_body",
    "record_prompt",
    "record_prompt_text",
    "check_image_count",
    "image_failures_error",
    "read_data_uri",
    "record_questions",
    "record_slots",
    "shown_url",
    "to_record",
    "validation_detail",
]
