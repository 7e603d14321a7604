"""`caslie serve CONFIG`: CASLIE online on Ray Serve (also `serve run configs/serve-demo.yaml`, `serve deploy`).

Deployments (each with its own autoscaling, and `@serve.batch` where a model runs):
    Captioner         context-conditioned captions of client images
    Judge_<name>      one per judge model: yes/no on each caption
    Predictor         base model + PEFT adapters side by side, chosen per request (model multiplexing)
    Ingress           FastAPI: /v1/predict, /v1/enrich, /v1/chat/completions, /v1/models, /healthz

The deployments are shims over `caslie_core` (`models.captioner`, `models.judge`, `models.predictor`,
`serving`). The ingress fetches
and decodes images itself (threads; SSRF-safe), fans the captions and votes out concurrently, and retries
a model call whose replica died. Overload gives 503 with Retry-After (Serve's max_queued_requests), a
passed deadline 504.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations (Request) on the routes.
import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from caslie_core import serving as sv
from caslie_core.config import ServeConfig
from caslie_core.serving.spec import app_spec

from . import metrics
from .common import ROOT, init_ray, job_entry, job_main, requiet
from .common import log as say  # the driver's own lines (`caslie serve`)
from .serve_models import Captioner, Judge, predictor_deployment

log = logging.getLogger("ray.serve")
APP_NAME = "caslie"
DESCRIPTION = "Context-conditioned captions, caption-quality votes and answers of a fine-tuned e-commerce model."
# The docs routes are the ingress's own (below): behind the API key when one is set.
api = FastAPI(title="CASLIE", version="1", description=DESCRIPTION, docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, spec: dict, captioner, judges: list, predictor) -> None:
        cfg = ServeConfig.model_validate(spec["config"])
        self.cfg = cfg
        self.captioner, self.predictor = captioner, predictor
        self.judges = dict(zip([j.name for j in cfg.judges], judges))
        self.catalog = sv.ServedModels(spec["models"])  # model ids -> multiplexed ids (adapter or "base")
        self.style = spec["style"]
        self.key_digest = spec["key_digest"]
        self.policy = cfg.fetch.policy()
        self.in_flight = 0
        f = cfg.fetch
        self.intake = sv.ImageIntake(
            self.policy,
            fetch_threads=f.threads,
            decode_threads=f.decode_threads,
            per_request=f.per_request,
            size=cfg.captioner.image_size,
            max_pixels=f.max_pixels,
            max_decoded_bytes=f.max_decoded_bytes,
        )
        from ray.exceptions import ActorUnavailableError, RayActorError

        self.retryable = (RayActorError, ActorUnavailableError)  # a replica died mid-request: retry elsewhere

    async def _body(self, request: Request, seconds: float) -> bytes:
        """The body within `seconds` (408 after), at most `http.max_body_bytes` (413)."""
        limit = self.cfg.http.max_body_bytes
        try:
            return await asyncio.wait_for(
                sv.read_body(request.stream(), limit, request.headers.get("content-length", "")), seconds
            )
        except TimeoutError:
            raise sv.ApiError(
                408, f"the request body did not arrive within {seconds:g}s", {"Connection": "close"}, code="timeout"
            ) from None

    def _authorize(self, request: Request) -> None:
        sv.check_headers(request.headers.raw, self.cfg.http.max_header_bytes)
        if not sv.key_matches(request.headers, self.key_digest):  # Starlette headers: case-insensitive
            raise sv.unauthorized()

    def _error(self, err: sv.ApiError, openai: bool) -> JSONResponse:
        if openai:  # OpenAI's error object; an invalid request is 400 there (422 on our own routes)
            return JSONResponse(err.openai_body(), status_code=err.openai_status(), headers=err.headers)
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

    def _overloaded(self, why: str) -> sv.ApiError:
        return sv.overloaded(why, self.cfg.http.retry_after_s)

    async def _handle(self, request: Request, model, work, *, openai: bool = False):
        """`_respond`, counted: requests in flight on this replica, and each answer by route and status."""
        self.in_flight += 1
        metrics.set_gauge("caslie_serve_requests_in_flight", self.in_flight)
        status = 500
        try:
            response = await self._respond(request, model, work, openai=openai)
            status = getattr(response, "status_code", 200)
            return response
        finally:
            self.in_flight -= 1
            metrics.set_gauge("caslie_serve_requests_in_flight", self.in_flight)
            metrics.inc("caslie_serve_requests_total", route=request.url.path, status=status)

    async def _respond(self, request: Request, model, work, *, openai: bool = False):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        http = self.cfg.http
        start = time.monotonic()  # the deadline counts from here: reading the body is part of the request
        stage = {"name": "reading the request", "deadline": start + http.request_timeout_s}
        try:
            self._authorize(request)
            req = sv.parse_body(await self._body(request, min(http.body_timeout_s, http.request_timeout_s)), model)
            timeout = min(req.timeout_s or http.request_timeout_s, http.request_timeout_s)
            stage["deadline"] = start + timeout
            try:
                return await asyncio.wait_for(work(req, stage), max(0.0, stage["deadline"] - time.monotonic()))
            except TimeoutError:
                raise sv.ApiError(
                    504, f"deadline of {timeout:g}s passed while {stage['name']}", code="timeout"
                ) from None
        except sv.ApiError as e:
            return self._error(e, openai)
        except BackPressureError as e:
            return self._error(self._overloaded(str(e)), openai)
        except DeploymentUnavailableError as e:
            return self._error(self._overloaded(f"a deployment is unavailable ({e})"), openai)
        except Exception:  # a bug or a model crash: logged with an id the client can quote, no internals sent
            ref = uuid.uuid4().hex[:12]
            log.exception("request failed (error id %s)", ref)
            return self._error(sv.ApiError(500, f"internal error (error id {ref})", code="internal"), openai)

    async def _call(self, make):
        """Await a model call; a replica that died mid-request is retried on another (idempotent)."""
        retries = self.cfg.http.downstream_retries
        for attempt in range(retries + 1):
            try:
                return await make()
            except self.retryable as e:
                if attempt >= retries:
                    raise self._overloaded(f"a model replica was lost ({type(e).__name__})") from None
                await asyncio.sleep(0.5 * 2**attempt)

    async def _model_id(self, name: str | None) -> tuple[str, str]:
        """(listed id, multiplexed id); may list the adapter store, so off the event loop."""
        return await asyncio.to_thread(self.catalog.resolve, name)

    async def _images(self, slots: list[sv.ImageSlot], mode: str, stage: dict) -> None:
        stage["name"] = "fetching images"
        sv.check_image_count(slots, self.cfg.fetch.max_images)
        failures = await self.intake.load(slots, deadline=stage["deadline"])
        if failures and mode == "fail":
            raise sv.image_failures_error(failures)

    async def _caption(self, slots: list[sv.ImageSlot], stage: dict) -> None:
        stage["name"] = "captioning"

        async def one(slot: sv.ImageSlot) -> None:
            sv.caption_outcome(slot, await self._call(lambda: self.captioner.caption.remote(slot.pixels, slot.prompt)))
            slot.pixels = None

        await asyncio.gather(*(one(s) for s in slots if s.error is None))

    async def _judge(self, slots: list[sv.ImageSlot], questions: dict[int, str], stage: dict) -> None:
        stage["name"] = "judging captions"
        by_index = {s.index: s for s in slots}

        async def one(index: int, name: str, handle) -> None:
            reply = await self._call(lambda: handle.vote.remote(questions[index]))
            by_index[index].votes[name] = reply["vote"]

        await asyncio.gather(*(one(i, n, h) for i in questions for n, h in self.judges.items()))

    async def _answer(self, prompt: str, model_id: str, stage: dict, limit=None, sampling=None) -> dict:
        stage["name"] = "answering"
        handle = self.predictor.options(multiplexed_model_id=model_id)
        answer = await self._call(lambda: handle.predict.remote(prompt, limit, sampling))
        if answer["error"]:
            raise sv.ApiError(500, f"the model failed: {answer['error']}", code="model_error")
        cap = min(limit or self.cfg.model.max_new_tokens, self.cfg.model.max_new_tokens)
        answer["finish_reason"] = "length" if answer["n_new_tokens"] >= cap and not answer["stopped"] else "stop"
        return answer

    def _stream(self, chunks: sv.Chunks, prompt: str, model_id: str, req, stage: dict) -> StreamingResponse:
        """Server-sent events of the answer as the predictor replica generates it (a Serve streaming call);
        a client that goes away cancels the call, which stops the generation."""
        handle = self.predictor.options(multiplexed_model_id=model_id, stream=True)
        tokens = handle.stream.remote(prompt, req.limit(), sv.request_sampling(req))
        events = sv.stream_events(chunks, tokens, include_usage=req.include_usage, deadline=stage["deadline"])
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _enrich(self, req: sv.EnrichRequest, stage: dict, timings: dict):
        stage["name"] = "validating the record"
        record = sv.to_record(req)
        slots = sv.record_slots(record)
        for name, step in (
            ("fetch", lambda: self._images(slots, req.image_errors, stage)),
            ("caption", lambda: self._caption(slots, stage)),
            ("judge", lambda: self._judge(slots, sv.record_questions(record, slots), stage)),
        ):
            t = time.perf_counter()
            await step()
            timings[name] = round((time.perf_counter() - t) * 1000, 1)
            metrics.observe("caslie_serve_stage_seconds", time.perf_counter() - t, stage=name)
        return record, sv.enriched(record, slots)

    @api.post("/v1/enrich")
    async def enrich(self, request: Request):
        async def work(req: sv.EnrichRequest, stage: dict):
            t0, timings = time.perf_counter(), {}
            record, out = await self._enrich(req, stage, timings)
            timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
            return {"id": record.id, "task": record.task, **out, "timings_ms": timings}

        return await self._handle(request, sv.EnrichRequest, work)

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        async def work(req: sv.PredictRequest, stage: dict):
            t0, timings = time.perf_counter(), {}
            name, model_id = await self._model_id(req.adapter)
            record, out = await self._enrich(req, stage, timings)
            t = time.perf_counter()
            ans = await self._answer(sv.record_prompt_text(record, out, style=self.style), model_id, stage)
            timings["predict"] = round((time.perf_counter() - t) * 1000, 1)
            metrics.observe("caslie_serve_stage_seconds", time.perf_counter() - t, stage="predict")
            timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
            return sv.predict_response(record, name, out, ans, timings)

        return await self._handle(request, sv.PredictRequest, work)

    async def _chat_prompt(self, req: sv.ChatRequest, stage: dict) -> tuple[str, list]:
        """The chat as one prompt: its images fetched, captioned in context and judged (CASLIE), kept captions in."""
        text, urls = sv.chat_request_text(req)
        slots = sv.chat_slots(text, urls)
        await self._images(slots, "fail", stage)
        await self._caption(slots, stage)
        await self._judge(slots, sv.chat_questions(text, slots), stage)
        return sv.chat_prompt(text, slots, style=self.style), slots

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def work(req: sv.ChatRequest, stage: dict):
            req.check_supported()
            name, model_id = await self._model_id(req.model)
            prompt, slots = await self._chat_prompt(req, stage)
            if req.stream:
                return self._stream(sv.Chunks(name, chat=True), prompt, model_id, req, stage)
            ans = await self._answer(prompt, model_id, stage, req.limit(), sv.request_sampling(req))
            return sv.chat_completion(
                name,
                ans["text"],
                prompt_tokens=ans["n_prompt_tokens"],
                completion_tokens=ans["n_new_tokens"],
                finish_reason=ans["finish_reason"],
                extra={"images": [s.report() for s in slots]},
            )

        return await self._handle(request, sv.ChatRequest, work, openai=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """The prompt as it is (the model's own template, no images), one string or a list (a choice each)."""

        async def work(req: sv.CompletionRequest, stage: dict):
            req.check_supported()
            name, model_id = await self._model_id(req.model)
            if req.stream:
                return self._stream(sv.Chunks(name, chat=False), req.prompts()[0], model_id, req, stage)
            sampling = sv.request_sampling(req)
            answers = await asyncio.gather(
                *(self._answer(p, model_id, stage, req.limit(), sampling) for p in req.prompts())
            )
            return sv.text_completion(name, answers)

        return await self._handle(request, sv.CompletionRequest, work, openai=True)

    async def _open(self, request: Request, answer):
        try:
            self._authorize(request)
            return await answer()
        except sv.ApiError as e:
            return self._error(e, True)

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self._open(request, lambda: asyncio.to_thread(lambda: sv.models_list(self.catalog.cards())))

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        return await self._open(request, lambda: asyncio.to_thread(self.catalog.card, model_id))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        try:
            self._authorize(request)
        except sv.ApiError as e:
            return self._error(e, False)
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        """Swagger UI without a key only; with a key set, read /openapi.json with the key instead."""
        if self.key_digest is not None:
            return JSONResponse({"detail": "docs are off when an API key is set; GET /openapi.json with the key"}, 404)
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="CASLIE")

    @staticmethod
    async def _ping(handle) -> str:
        # A method: the pickled ingress class missed a module-level helper (NameError in the replica).
        try:
            return await asyncio.wait_for(handle.ping.remote(), 10)
        except Exception as e:  # noqa: BLE001 - reported in the health body
            return f"{type(e).__name__}: {e}"

    @api.get("/healthz")
    async def healthz(self, deep: bool = False):
        """Liveness (no auth). `?deep=true` also pings one replica of every model deployment."""
        body: dict = {"status": "ok", "models": list(self.catalog.ids)}
        if deep:
            handles = {
                "Captioner": self.captioner,
                "Predictor": self.predictor,
                **{f"Judge_{n}": h for n, h in self.judges.items()},
            }

            replies = await asyncio.gather(*[self._ping(h) for h in handles.values()])
            body["deployments"] = dict(zip(handles, replies))
            if any(r != "ok" for r in replies):
                body["status"] = "degraded"
                return JSONResponse(body, status_code=503)
        return body


def build_app(args: ServeConfig) -> serve.Application:
    """The Serve application; `args` is the `args:` mapping of a Serve config file (validated by Serve)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    spec = app_spec(cfg, root=ROOT)
    retry = cfg.http.retry_after_s
    c = cfg.captioner
    # A deployment's own settings (replicas, autoscaling, queue limits, batching through user_config) are options,
    # not init arguments: a change to them is a light update (Serve reconfigures running replicas) and never
    # reloads a model. The init arguments are what a model needs to load.
    bare = {"deployment"}
    captioner = Captioner.options(**c.deployment.options("Captioner", retry)).bind(
        c.model_dump(mode="json", exclude=bare)
    )
    judges = [
        Judge.options(**j.deployment.options(f"Judge_{j.name}", retry)).bind(j.model_dump(mode="json", exclude=bare))
        for j in cfg.judges
    ]
    m = cfg.model
    predictor = (
        predictor_deployment(m.max_adapters_per_replica)
        .options(**m.deployment.options("Predictor", retry))
        .bind(spec["predictor"])
    )
    ingress_spec = {
        "config": cfg.model_dump(mode="json"),
        "models": spec["models"],
        "style": spec["style"],
        "key_digest": spec["key_digest"],
    }
    return Ingress.options(**cfg.http.ingress.options("Ingress", retry, live=False)).bind(
        ingress_spec, captioner, judges, predictor
    )


def start(cfg: ServeConfig, *, name: str = APP_NAME) -> str:
    """Start Serve on `http.host:http.port` and deploy the app; returns the base URL once it is ready."""
    # ray.log_format=json (or the file's logging_config encoding JSON): Serve's controller, proxies and our
    # replicas write JSON lines too
    logging = {"encoding": "JSON"} if cfg.ray.log_format == "json" else None
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, logging_config=logging)
    requiet()  # Serve sets its driver-side logger on start
    serve.run(build_app(cfg), name=name, route_prefix="/", logging_config=logging)
    return f"http://{cfg.http.host}:{cfg.http.port}"


@contextlib.contextmanager
def serving(cfg: ServeConfig):
    """`with serving(cfg) as url:` the app runs inside the block and is shut down after it."""
    started = init_ray(cfg.ray)
    before = serve.status()
    shared = bool(before.proxies or before.applications)  # Serve already runs here (other apps may too)
    try:
        yield start(cfg)
    finally:
        serve.delete(APP_NAME) if shared else serve.shutdown()
        if started:
            import ray

            ray.shutdown()


def run(cfg: ServeConfig) -> None:
    """`caslie serve`: serve until interrupted (Ctrl-C or SIGTERM), then shut Serve down in order."""
    stop = threading.Event()
    started = init_ray(cfg.ray)
    # Ray's driver handler turns SIGTERM into SystemExit wherever the main thread is (mid-deploy, inside
    # gRPC calls) and the process then aborts on the way out; ours, set after Ray's, only asks the loop
    # below to end, so Serve drains and stops (also when the signal comes while the app is deploying).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with serving(cfg) as url:
            say.info(f"CASLIE is serving at {url}; Ctrl-C stops it\n  curl {url}/healthz   {url}/v1/models")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            say.info("shutting down")
    finally:
        if started:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return job_main("serve", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("serve"))
