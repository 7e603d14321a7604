"""Captioner and judges on an OpenAI-compatible server (`engine: openai`): vLLM, SGLang, Ray Serve LLM,
`transformers serve`. The same interfaces as the in-process models (`.caption(images, prompts)`,
`.vote(questions)`), so the batch job's stages and the service's parts use them unchanged.

Each actor or replica keeps up to `max_concurrency` requests in flight (a thread pool over one keep-alive
connection pool), spread round-robin over the base URLs. Images go as `data:` URLs of the decoded, resized image
(the server never fetches the open internet for us). A request that fails after its retries (connection errors,
429 and 5xx, honouring `Retry-After`) is that item's error, with the server's status and message; the stages' rule
(`ModelCalls`) stops the job when every item of several batches fails (the server is down), naming the URL.

Judges: `generate` as the research code (the answer's first characters; `structured_choice` asks the server for
exactly yes or no); `logits` through the first token's `top_logprobs` (the best yes-form against the best no-form,
as the in-process logits judge compares its yes and no token ids). `preflight` checks a server once, at a job's
start: the model is served, and a logits judge gets logprobs (else the job fails, or falls back to generate where
the config allows it).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError, EngineError
from .batching import error_text
from .captioner import CaptionResult
from .judge import NO_FORMS, YES_FORMS, Vote, parse_judge_answer, research_ballot

TOP_LOGPROBS = 20
RETRIED = {408, 409, 425, 429, 500, 502, 503, 504}


class RemoteError(Exception):
    """A request the server did not answer well: its URL, HTTP status (None: no answer) and message."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        self.url, self.status, self.message = url, status, message
        super().__init__(f"{url}: {'HTTP ' + str(status) if status else 'no answer'}: {message}")


class NoLogprobs(Exception):
    """The server answered a logits judge without logprobs (it ignores `logprobs`/`top_logprobs`)."""


class OpenAIClient:
    """Chat completions against one or several base URLs, with timeouts, retries and a bounded thread pool."""

    def __init__(self, endpoint, model: str) -> None:
        import urllib3

        self.endpoint, self.model = endpoint, endpoint.model or model
        self.urls = list(endpoint.base_url)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise ConfigError([f"openai.api_key_env: environment variable {endpoint.api_key_env} is not set"])
            self.headers["Authorization"] = f"Bearer {key}"
        timeout = urllib3.Timeout(connect=endpoint.connect_timeout, read=endpoint.read_timeout)
        self.http = urllib3.PoolManager(maxsize=endpoint.max_concurrency, timeout=timeout, retries=False, block=False)
        self.pool = ThreadPoolExecutor(endpoint.max_concurrency, thread_name_prefix="caslie-openai")

    def _url(self) -> str:
        with self._lock:
            return self.urls[next(self._turn) % len(self.urls)]

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call, retried on connection errors, 429 and 5xx (waiting `Retry-After` when the server says),
        within `total_timeout` (a server that drips its answer is cut off there); the reply's JSON, or
        `RemoteError`."""
        ep = self.endpoint
        deadline = time.monotonic() + ep.total_timeout
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(ep.retries + 1):
            url = self._url() + path
            wait = ep.backoff * 2**attempt
            try:
                status, headers, raw = self._exchange(method, url, data, deadline)
            except RemoteError as e:  # a connection refused, reset or timed out: retried
                err = e
            else:
                if status < 300:
                    try:
                        return json.loads(raw)
                    except ValueError:
                        raise RemoteError(url, status, f"malformed JSON: {raw[:200]!r}") from None
                err = RemoteError(url, status, _message(raw))
                if status not in RETRIED:
                    raise err
                wait = max(wait, _retry_after(headers.get("Retry-After")))
            if attempt >= ep.retries or time.monotonic() + wait > deadline:
                raise err
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _exchange(self, method: str, url: str, data: bytes | None, deadline: float) -> tuple[int, dict, bytes]:
        """(status, headers, body), the body read in partial reads, each within the read timeout, all of it
        within the request's deadline."""
        import urllib3

        ep = self.endpoint
        left = deadline - time.monotonic()
        timeout = urllib3.Timeout(connect=min(ep.connect_timeout, left), read=min(ep.read_timeout, left))
        try:
            r = self.http.request(method, url, body=data, headers=self.headers, preload_content=False, timeout=timeout)
            chunks = []
            while chunk := r.read1(65536):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    r.close()
                    raise RemoteError(url, None, f"the answer did not arrive within {ep.total_timeout:g}s")
            r.release_conn()
            return r.status, dict(r.headers), b"".join(chunks)
        except RemoteError:
            raise
        except Exception as e:  # noqa: BLE001 - refused, reset, timed out: the caller retries
            raise RemoteError(url, None, error_text(e)) from None

    def chat(self, messages: list[dict], **options) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": 0, **options}
        reply = self.request("POST", "/chat/completions", body)
        if not isinstance(reply, dict) or not reply.get("choices"):
            raise RemoteError(self.urls[0], 200, f"no choices in the reply: {str(reply)[:200]}")
        return reply

    def map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items))

    def served(self) -> list[str]:
        reply = self.request("GET", "/models")
        return [m.get("id") for m in reply.get("data", []) if isinstance(m, dict)]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.clear()


def _message(data: bytes) -> str:
    try:
        body = json.loads(data)
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return data[:300].decode("utf-8", "replace")


def _retry_after(value: str | None) -> float:
    try:
        return min(60.0, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


def data_url(image: Any, fmt: str = "png") -> str:
    """An image (PIL, or HxWx3 uint8 pixels) as a `data:` URL."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG" if fmt == "png" else "JPEG", **({"quality": 95} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


def text_of(reply: dict) -> str | None:
    return (reply["choices"][0].get("message") or {}).get("content")


class OpenAICaptioner:
    """Context-conditioned captions from a vision-language model behind an OpenAI-compatible server."""

    def __init__(self, model: str, endpoint, *, max_new_tokens: int = 128, batch_size: int = 8) -> None:
        self.client = OpenAIClient(endpoint, model)
        self.max_tokens = endpoint.max_tokens or max_new_tokens
        self.batch_size = batch_size  # what the stage hands over at once (the live setting of a replica)
        self.image_format = endpoint.image_format

    def _one(self, pair) -> CaptionResult:
        from ..prompts import clean_caption

        image, prompt = pair
        content = [{"type": "image_url", "image_url": {"url": data_url(image, self.image_format)}}]
        try:
            reply = self.client.chat(
                [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}], max_tokens=self.max_tokens
            )
            return CaptionResult(clean_caption(text_of(reply)))
        except Exception as e:  # noqa: BLE001 - one image's error
            return CaptionResult(None, error_text(e))

    def caption(self, images: list[Any], prompts: list[str]) -> list[CaptionResult]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image(s) for {len(prompts)} prompt(s)")
        return self.client.map(self._one, list(zip(images, prompts)))


class OpenAIJudge:
    """A CQE judge behind an OpenAI-compatible server: `generate` or `logits` (through `top_logprobs`)."""

    def __init__(
        self,
        model: str,
        endpoint,
        *,
        mode: str = "logits",
        max_new_tokens: int = 16,
        reply: str = "strict",
        system_message: str | None = None,
        batch_size: int = 16,
    ) -> None:
        self.client = OpenAIClient(endpoint, model)
        self.mode, self.reply, self.system_message = mode, reply, system_message
        self.max_tokens = endpoint.max_tokens or max_new_tokens
        self.structured = endpoint.structured_choice
        self.batch_size = batch_size

    def _messages(self, question: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_message}] if self.system_message else []
        return [*system, {"role": "user", "content": question}]

    def _one(self, question: str) -> Vote:
        try:
            if self.mode == "logits":
                return logits_vote(
                    self.client.chat(self._messages(question), max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
                )
            extra = {"structured_outputs": {"choice": ["yes", "no"]}, "guided_choice": ["yes", "no"]}
            reply = self.client.chat(
                self._messages(question), max_tokens=self.max_tokens, **(extra if self.structured else {})
            )
            text = text_of(reply)
            return Vote(research_ballot(text) if self.reply == "research" else parse_judge_answer(text), text)
        except Exception as e:  # noqa: BLE001 - one question's error
            return Vote(None, None, error_text(e))

    def vote(self, questions: list[str]) -> list[Vote]:
        return self.client.map(self._one, list(questions))


def logits_vote(reply: dict) -> Vote:
    """The first token's top logprobs: the best yes-form against the best no-form. A reply without logprobs is
    an error (never a silent "no")."""
    content = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
    top = content[0].get("top_logprobs") if content else None
    if not top:
        raise NoLogprobs("the server returned no logprobs for a logits judge (mode: logits needs them)")
    best = {}
    for t in top:
        side = "yes" if t.get("token") in YES_FORMS else "no" if t.get("token") in NO_FORMS else None
        if side is not None:
            best[side] = max(best.get(side, float("-inf")), float(t.get("logprob", float("-inf"))))
    if not best:
        return Vote(None, f"neither yes nor no among the top {len(top)} first tokens")
    y, n = best.get("yes", float("-inf")), best.get("no", float("-inf"))
    return Vote("yes" if y > n else "no", f"yes={y:.3f} no={n:.3f}")


def preflight(section, what: str) -> dict:
    """Check an `engine: openai` section once, before a job starts: the server answers, serves the model, and (a
    logits judge) returns logprobs. Returns what the provenance records (`served_model`, `hosts`) and
    `logprobs` (False: the server gave none). `what`: the section's config path, for the messages."""
    from urllib.parse import urlsplit

    ep = section.openai
    client = OpenAIClient(ep, section.model)
    try:
        try:
            served = client.served()
        except RemoteError as e:
            raise EngineError(f"{what}: the OpenAI-compatible server does not answer ({e})") from None
        if client.model not in served:
            raise ConfigError(
                [f"{what}.openai.model: {client.model!r} is not served at {', '.join(ep.base_url)}; served: {served}"]
            )
        messages = [{"role": "user", "content": "Answer yes or no: is this a test?"}]
        logits = getattr(section, "mode", None) == "logits"
        options = {"max_tokens": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS} if logits else {"max_tokens": 1}
        try:
            reply = client.chat(messages, **options)
        except RemoteError as e:
            raise EngineError(f"{what}: the server at {e.url} failed a first request: {e}") from None
        has_logprobs = True
        if logits:
            try:
                logits_vote(reply)
            except NoLogprobs:
                has_logprobs = False
        return {
            "served_model": reply.get("model") or client.model,
            "hosts": sorted({urlsplit(u).netloc for u in ep.base_url}),
            "logprobs": has_logprobs,
        }
    finally:
        client.close()


def check_engines(captioner, judges: list, say) -> dict:
    """`preflight` for each `engine: openai` section (`captioner` None: no captioning model), before a job or a
    service starts: a server that does not answer or does not serve the model fails it here, naming the URL. A
    logits judge whose server returns no logprobs fails it too (the fix named), or with `openai.logprobs:
    fallback_to_generate` becomes a generate judge (its section is changed; said once through `say`). Returns
    what the provenance records, by `captioner` or judge name."""
    found = {}
    if captioner is not None and captioner.engine == "openai":
        found["captioner"] = preflight(captioner, "captioner")
    for i, j in enumerate(judges):
        if j.engine != "openai":
            continue
        found[j.name] = info = preflight(j, f"judges.{i}")
        if j.mode == "logits" and not info["logprobs"]:
            where = ", ".join(j.openai.base_url)
            if j.openai.logprobs == "required":
                raise ConfigError(
                    [
                        f"judges.{i} ({j.name}): the server at {where} returns no logprobs, which mode: logits reads; "
                        f"set judges.{i}.mode: generate, or judges.{i}.openai.logprobs: fallback_to_generate"
                    ]
                )
            say(f"judge {j.name!r}: the server at {where} returns no logprobs; it judges by its answer (generate)")
            j.mode = "generate"
    return found
