"""`caslie serve CONFIG`: CASLIE online on Ray Serve (also `serve run configs/serve-demo.yaml`, `serve deploy`).

Deployments by `layout` (each with its own autoscaling, batched (`Gather`) where a model runs): split (GPUs):
Captioner, Judge_<name> per judge, Predictor (base + PEFT adapters chosen per request: model multiplexing);
panel: the judges together in one Panel; colocated (small models): one Models replica; single: the models in the
Ingress replica itself (no deployment call per request). Ingress (FastAPI):
/v1/predict, /v1/enrich, /v1/chat/completions, /v1/completions, /v1/models, /healthz. Shims over
`caslie_core`; the ingress fetches and decodes images itself (SSRF-safe), calls each model deployment once per
request (the co-located Models replica once for a whole /v1/predict or unstreamed chat), retries a call whose
replica died; overload gives 503 with Retry-After, a passed deadline 504. Starting and stopping it for
`caslie serve`: `serve_driver`.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations (Request) on the routes.
import asyncio
import functools
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from caslie_core import serving as sv
from caslie_core.config import ServeConfig
from caslie_core.serving.spec import app_spec

from . import counters, metrics
from . import serve_driver as driver
from .common import ROOT, job_entry, job_main
from .serve_driver import APP_NAME
from .serve_models import Captioner, Judge, Panel
from .serve_predictor import InProcess, models_args, predictor_deployment

log = logging.getLogger("ray.serve")
DESCRIPTION = "Context-conditioned captions, caption-quality votes and answers of a fine-tuned e-commerce model."
# The docs routes are the ingress's own (below): behind the API key when one is set.
api = FastAPI(title="CASLIE", version="1", description=DESCRIPTION, docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, spec: dict, handles: dict) -> None:
        cfg = ServeConfig.model_validate(spec["config"])
        self.cfg = cfg
        if isinstance(handles.get("Models"), list):  # layout single: the models live in this replica
            handles = {"Models": InProcess.build(*handles["Models"])}
        self.handles = handles  # deployment name -> handle (the layout's: Captioner, Panel or Judge_*, Predictor)
        self.colocated = "Models" in handles  # one replica (or this one) captions, judges and answers
        self.predictor = handles["Models" if self.colocated else "Predictor"]
        self.captioner = handles.get("Captioner")
        self.voters = [h for n, h in handles.items() if n == "Panel" or n.startswith("Judge_")]
        self.catalog = sv.ServedModels(spec["models"])  # model ids -> multiplexed ids (adapter or "base")
        self.style = spec["style"]
        self.key_digest = spec["key_digest"]
        self.policy = cfg.fetch.policy()
        self.in_flight = counters.InFlight()  # its peak per report interval: a burst between two reports shows
        self.answered = counters.Counts()  # a route and status first seen starts at zero: its first answer is seen
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
        self.in_flight.up()
        status = 500
        try:
            response = await self._respond(request, model, work, openai=openai)
            status = getattr(response, "status_code", 200)
            return response
        finally:
            self.in_flight.down()
            route = getattr(request.scope.get("route"), "path", request.url.path)  # the route, not a prefixed path
            self.answered.add("caslie_serve_requests_total", route=route, status=status)

    async def _respond(self, request: Request, model, work, *, openai: bool = False):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        http = self.cfg.http
        began = time.monotonic()  # the deadline counts from here: reading the body is part of the request
        stage = {"name": "reading the request", "deadline": began + http.request_timeout_s}
        try:
            self._authorize(request)
            req = sv.parse_body(await self._body(request, min(http.body_timeout_s, http.request_timeout_s)), model)
            timeout = min(req.timeout_s or http.request_timeout_s, http.request_timeout_s)
            stage["deadline"] = began + timeout
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
        """(listed id, multiplexed id); with an adapter store it may list the store, so off the event loop."""
        resolve = functools.partial(self.catalog.resolve, name)
        return await asyncio.to_thread(resolve) if self.catalog.store else resolve()

    async def _images(self, slots: list[sv.ImageSlot], mode: str, stage: dict) -> None:
        stage["name"] = "fetching images"
        sv.check_image_count(slots, self.cfg.fetch.max_images)
        failures = await self.intake.load(slots, deadline=stage["deadline"])
        if failures and mode == "fail":
            raise sv.image_failures_error(failures)

    async def _judged(self, slots: list[sv.ImageSlot], questions_of, stage: dict, timings: dict) -> list:
        """The images captioned, then judged (`questions_of(slots)`: the core's questions): one call to the
        captioner and one to the Panel or each judge, or one to the co-located Models replica."""
        if not slots:  # a text-only chat: nothing to caption or judge
            return slots
        if self.colocated:
            stage["name"] = "captioning and judging"
            slots, times = await self._call(lambda: self.predictor.enrich.remote(slots, questions_of))
        else:

            async def caption_many(pixels, prompts):
                return await self._call(lambda: self.captioner.caption_many.remote(pixels, prompts))

            async def vote_many(questions):  # each judge (or the Panel) once; their votes merged per question
                replies = await asyncio.gather(
                    *(self._call(lambda h=h: h.vote_many.remote(questions)) for h in self.voters)
                )
                return [{k: v for reply in replies for k, v in reply[i].items()} for i in range(len(questions))]

            times = await sv.caption_and_judge(slots, questions_of, caption_many, vote_many, stage)
        self._timed(times, timings)
        return slots

    @staticmethod
    def _timed(times: dict, timings: dict) -> None:
        """Stage seconds into the response's `timings_ms` and the stage histogram."""
        for name, seconds in times.items():
            timings[name] = round(seconds * 1000, 1)
            metrics.observe("caslie_serve_stage_seconds", seconds, stage=name)

    async def _answer(self, prompt: str, model_id: str, stage: dict, limit=None, sampling=None) -> dict:
        stage["name"] = "answering"
        handle = self.predictor.options(multiplexed_model_id=model_id)
        return self._finished(await self._call(lambda: handle.predict.remote(prompt, limit, sampling)), limit)

    async def _enriched_answer(
        self, slots, questions_of, prompt_of, model_id: str, stage, timings, limit=None, sampling=None
    ):
        """Co-located layouts: captions, votes and the answer in one call to the Models replica (or this one,
        `Models.answer_enriched`); the slots and the checked answer back."""
        stage["name"] = "captioning, judging and answering"
        handle = self.predictor.options(multiplexed_model_id=model_id)
        slots, ans, times = await self._call(
            lambda: handle.answer_enriched.remote(slots, questions_of, prompt_of, limit, sampling)
        )
        self._timed(times, timings)
        return slots, self._finished(ans, limit)

    def _finished(self, answer: dict, limit=None) -> dict:
        """A predictor's answer checked (a model failure is a 500), with its OpenAI finish reason."""
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

    async def _record(self, req: sv.EnrichRequest, stage: dict, timings: dict):
        """The request's record and its image slots, the images fetched and decoded."""
        stage["name"] = "validating the record"
        record = sv.to_record(req)
        slots = sv.record_slots(record, self.cfg.cqe.vote)
        t = time.perf_counter()
        await self._images(slots, req.image_errors, stage)
        self._timed({"fetch": time.perf_counter() - t}, timings)
        return record, slots

    async def _enrich(self, req: sv.EnrichRequest, stage: dict, timings: dict):
        record, slots = await self._record(req, stage, timings)
        slots = await self._judged(slots, functools.partial(sv.record_questions, record), stage, timings)
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
            if self.colocated:  # one call: the Models replica (or this one) captions, judges and answers
                record, slots = await self._record(req, stage, timings)
                prompt_of = functools.partial(sv.record_prompt, record, style=self.style)
                questions_of = functools.partial(sv.record_questions, record)
                slots, ans = await self._enriched_answer(slots, questions_of, prompt_of, model_id, stage, timings)
                out = sv.enriched(record, slots)
            else:
                record, out = await self._enrich(req, stage, timings)
                t = time.perf_counter()
                ans = await self._answer(sv.record_prompt_text(record, out, style=self.style), model_id, stage)
                self._timed({"predict": time.perf_counter() - t}, timings)
            timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
            return sv.predict_response(record, name, out, ans, timings)

        return await self._handle(request, sv.PredictRequest, work)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        """The chat as one prompt: its images fetched, captioned in context and judged (CASLIE), kept captions in;
        in the co-located layouts a chat not streamed is one call (as a /v1/predict)."""

        async def work(req: sv.ChatRequest, stage: dict):
            req.check_supported()
            name, model_id = await self._model_id(req.model)
            text, urls = sv.chat_request_text(req)
            slots = sv.chat_slots(text, urls, self.cfg.cqe.vote)
            await self._images(slots, "fail", stage)
            questions_of = functools.partial(sv.chat_questions, text)
            prompt_of = functools.partial(sv.chat_prompt, text, style=self.style)
            limit, sampling = req.limit(), sv.request_sampling(req)
            if self.colocated and not req.stream:
                slots, ans = await self._enriched_answer(
                    slots, questions_of, prompt_of, model_id, stage, {}, limit, sampling
                )
            else:
                slots = await self._judged(slots, questions_of, stage, {})
                if req.stream:
                    return self._stream(sv.Chunks(name, chat=True), prompt_of(slots), model_id, req, stage)
                ans = await self._answer(prompt_of(slots), model_id, stage, limit, sampling)
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

    def check_health(self) -> None:  # layout single: the models in this replica report their own failures
        if isinstance(self.predictor, InProcess):
            self.predictor.target.check_health()

    def reconfigure(self, user_config: dict) -> None:  # layout single: live batching of the models in here
        if isinstance(self.predictor, InProcess):
            self.predictor.target.reconfigure(user_config)

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
            handles = self.handles
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
    m = cfg.model
    models = models_args(cfg, spec)  # [max adapters, predictor spec, captioner section, judge sections]
    captioner, judges = models[2], models[3]
    if cfg.layout == "single":  # the models in the ingress's own replica (built there), sized by model.deployment
        handles = {"Models": models}
    elif cfg.layout == "colocated":  # one replica for every model, sized by model.deployment
        colocated = predictor_deployment(m.max_adapters_per_replica, colocated=True)
        handles = {"Models": colocated.options(**m.deployment.options("Models", retry)).bind(*models[1:])}
    else:
        handles = {
            "Captioner": Captioner.options(**c.deployment.options("Captioner", retry)).bind(captioner),
            "Predictor": predictor_deployment(m.max_adapters_per_replica)
            .options(**m.deployment.options("Predictor", retry))
            .bind(spec["predictor"]),
        }
        if cfg.layout == "panel":
            handles["Panel"] = Panel.options(**cfg.panel.options("Panel", retry)).bind(judges)
        else:
            for j, args in zip(cfg.judges, judges):
                name = f"Judge_{j.name}"
                handles[name] = Judge.options(**j.deployment.options(name, retry)).bind(args)
    ingress_spec = {
        "config": cfg.model_dump(mode="json"),
        "models": spec["models"],
        "style": spec["style"],
        "key_digest": spec["key_digest"],
    }
    ingress = m.deployment if cfg.layout == "single" else cfg.http.ingress
    return Ingress.options(**ingress.options("Ingress", retry, live=cfg.layout == "single")).bind(ingress_spec, handles)


def start(cfg: ServeConfig, *, name: str = APP_NAME) -> str:
    """Start Serve on `http.host:http.port` and deploy the app; returns the base URL once it is ready."""
    return driver.start(cfg, build_app, name=name)


def serving(cfg: ServeConfig):
    """`with serving(cfg) as url:` the app runs inside the block and is shut down after it."""
    return driver.serving(cfg, build_app)


def run(cfg: ServeConfig) -> None:
    """`caslie serve`: serve until interrupted (Ctrl-C or SIGTERM), then shut Serve down in order."""
    driver.run(cfg, build_app)


def main(argv: list[str] | None = None) -> int:
    return job_main("serve", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("serve"))
