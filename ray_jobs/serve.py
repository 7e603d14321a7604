"""`caslie serve CONFIG`: CASLIE online on Ray Serve (also `serve run configs/serve-demo.yaml`, `serve deploy`).

The ingress (FastAPI) is HTTP only: API keys, body and header limits, the request's deadline, a client that goes
away, and errors as status codes (OpenAI's error object on the OpenAI routes). What a route does is the core's
(`caslie_core.serving.routes`, over an engine); which engine runs the models is the layout's, chosen once here
(`serve_engines`): split (a Captioner, a Judge_<name> per judge, a Predictor with its LoRA adapters multiplexed),
panel (the judges together in one Panel), colocated (one Models deployment), single (the models in the ingress's
own replica). The model deployments: `serve_models`; starting and stopping the app: `serve_driver`.
Routes: /v1/predict, /v1/enrich, /v1/chat/completions, /v1/completions, /v1/models, /healthz, /openapi.json, /docs.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations (Request) on the routes.
import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from caslie_core import serving as sv
from caslie_core.config import ServeConfig
from caslie_core.serving import routes
from caslie_core.serving.engine import Stage
from caslie_core.serving.spec import app_spec

from . import counters, metrics
from . import serve_driver as driver
from .common import ROOT, job_entry, job_main
from .serve_driver import APP_NAME
from .serve_engines import engine_for
from .serve_models import Captioner, Models, ModelsDeployment, Panel, Predictor

log = logging.getLogger("ray.serve")
DESCRIPTION = "Context-conditioned captions, caption-quality votes and answers of a fine-tuned e-commerce model."
# The docs routes are the ingress's own (below): behind the API key when one is set.
api = FastAPI(title="CASLIE", version="1", description=DESCRIPTION, docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, spec: dict, handles: dict) -> None:
        cfg = self.cfg = ServeConfig.model_validate(spec["config"])
        self.local = Models(**handles["Models"]) if cfg.layout == "single" else None  # its models, in here
        if self.local is not None:
            handles = {"Models": self.local}
        http = cfg.http
        self.service = routes.Service(
            engine_for(cfg.layout, handles, retries=http.downstream_retries, retry_after_s=http.retry_after_s),
            sv.ImageIntake.from_config(cfg.fetch, size=cfg.captioner.image_size),
            sv.ServedModels(spec["models"]),  # model ids -> multiplexed ids (adapter or "base")
            spec["style"],
            rule=cfg.cqe.vote,
            max_images=cfg.fetch.max_images,
            observe=lambda stage, s: metrics.observe("caslie_serve_stage_seconds", s, stage=stage),
            on_images=lambda slots: [
                self.answered.add("caslie_serve_images_total", outcome=s.outcome()) for s in slots
            ],
        )
        self.key_digest = spec["key_digest"]
        self.in_flight = counters.InFlight()  # its peak per report interval: a burst between two reports shows
        self.answered = counters.Counts()  # a route and status first seen starts at zero: its first answer is seen

    def _authorize(self, request: Request) -> None:
        sv.check_headers(request.headers.raw, self.cfg.http.max_header_bytes)
        if not sv.key_matches(request.headers, self.key_digest):  # Starlette headers: case-insensitive
            raise sv.unauthorized()

    @staticmethod
    def _error(err: sv.ApiError, openai: bool) -> JSONResponse:
        return JSONResponse(err.body(openai), status_code=err.status_for(openai), headers=err.headers)

    async def _handle(self, request: Request, model, route, *, openai: bool = False):
        """`_respond`, counted: requests in flight on this replica, and each answer by route and status."""
        self.in_flight.up()
        status = 500
        try:
            response = await self._respond(request, model, route, openai=openai)
            status = getattr(response, "status_code", 200)
            return response
        finally:
            self.in_flight.down()
            path = getattr(request.scope.get("route"), "path", request.url.path)  # the route, not a prefixed path
            self.answered.add("caslie_serve_requests_total", route=path, status=status)

    async def _respond(self, request: Request, model, route, *, openai: bool = False):
        """Auth, the body (its own deadline and size cap), the request validated, `route(service, request, stage)`
        within the request's deadline; every failure as a status code."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        http = self.cfg.http
        began = time.monotonic()  # the deadline counts from here: reading the body is part of the request
        stage = Stage("reading the request", began + http.request_timeout_s)
        retry = http.retry_after_s
        try:
            self._authorize(request)
            seconds = min(http.body_timeout_s, http.request_timeout_s)
            body = await sv.read_body(
                request.stream(), http.max_body_bytes, request.headers.get("content-length", ""), seconds
            )
            req = sv.parse_body(body, model)
            timeout = min(req.timeout_s or http.request_timeout_s, http.request_timeout_s)
            stage.deadline = began + timeout
            try:
                out = await asyncio.wait_for(route(self.service, req, stage), stage.left())
            except TimeoutError:
                raise sv.ApiError(504, f"deadline of {timeout:g}s passed while {stage.name}", code="timeout") from None
            if isinstance(out, routes.Events):  # a client that goes away closes them, which cancels the model call
                headers = {"Cache-Control": "no-cache"}
                return StreamingResponse(out.events, media_type="text/event-stream", headers=headers)
            return out
        except sv.ApiError as e:
            return self._error(e, openai)
        except BackPressureError as e:
            return self._error(sv.overloaded(str(e), retry), openai)
        except DeploymentUnavailableError as e:
            return self._error(sv.overloaded(f"a deployment is unavailable ({e})", retry), openai)
        except Exception:  # a bug or a model crash: logged with an id the client can quote, no internals sent
            ref = uuid.uuid4().hex[:12]
            log.exception("request failed (error id %s)", ref)
            return self._error(sv.ApiError(500, f"internal error (error id {ref})", code="internal"), openai)

    @api.post("/v1/enrich")
    async def enrich(self, request: Request):
        return await self._handle(request, sv.EnrichRequest, routes.enrich)

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        return await self._handle(request, sv.PredictRequest, routes.predict)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        """The chat as one prompt: its images fetched, captioned in context and judged (CASLIE), kept captions in."""
        return await self._handle(request, sv.ChatRequest, routes.chat, openai=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """The prompt as it is (the model's own template, no images), one string or a list (a choice each)."""
        return await self._handle(request, sv.CompletionRequest, routes.completions, openai=True)

    async def _open(self, request: Request, answer, openai: bool = True):
        """A read-only route: auth, then `answer()` (a value, or an awaitable)."""
        try:
            self._authorize(request)
            out = answer()
            return await out if asyncio.iscoroutine(out) else out
        except sv.ApiError as e:
            return self._error(e, openai)

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self._open(request, lambda: routes.models(self.service))

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        return await self._open(request, lambda: routes.model(self.service, model_id))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        return await self._open(request, api.openapi, openai=False)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        """Swagger UI without a key only; with a key set, read /openapi.json with the key instead."""
        if self.key_digest is not None:
            return JSONResponse({"detail": "docs are off when an API key is set; GET /openapi.json with the key"}, 404)
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="CASLIE")

    def check_health(self) -> None:  # layout single: the models in this replica report their own failures
        if self.local is not None:
            self.local.check_health()

    def reconfigure(self, user_config: dict) -> None:  # layout single: live batching of the models in here
        if self.local is not None:
            self.local.reconfigure(user_config)

    @api.get("/healthz")
    async def healthz(self, deep: bool = False):
        """Liveness (no auth). `?deep=true` also pings one replica of every model deployment."""
        body: dict = {"status": "ok", "models": list(self.service.catalog.ids)}
        if deep:
            body["deployments"] = await self.service.engine.health()
            if any(r != "ok" for r in body["deployments"].values()):
                body["status"] = "degraded"
                return JSONResponse(body, status_code=503)
        return body


def build_app(args: ServeConfig) -> serve.Application:
    """The Serve application; `args` is the `args:` mapping of a Serve config file (validated by Serve)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    spec = app_spec(cfg, root=ROOT)
    retry, m = cfg.http.retry_after_s, cfg.model
    # A deployment's own settings (replicas, autoscaling, queue limits, batching through user_config) are options,
    # not init arguments: a change to them is a light update (Serve reconfigures running replicas) and never
    # reloads a model. The init arguments are what a model needs to load.
    bare = {"deployment"}
    captioner = cfg.captioner.model_dump(mode="json", exclude=bare)
    judges = [j.model_dump(mode="json", exclude=bare) for j in cfg.judges]
    models = {"predictor": spec["predictor"], "max_adapters": m.max_adapters_per_replica}
    if cfg.layout == "single":  # the models in the ingress's own replica (built there), sized by model.deployment
        handles = {"Models": {**models, "captioner": captioner, "judges": judges}}
    elif cfg.layout == "colocated":  # one replica for every model, sized by model.deployment
        bound = ModelsDeployment.options(**m.deployment.options("Models", retry))
        handles = {"Models": bound.bind(**models, captioner=captioner, judges=judges)}
    else:
        handles = {
            "Captioner": Captioner.options(**cfg.captioner.deployment.options("Captioner", retry)).bind(captioner),
            "Predictor": Predictor.options(**m.deployment.options("Predictor", retry)).bind(**models),
        }
        if cfg.layout == "panel":
            handles["Panel"] = Panel.options(**cfg.panel.options("Panel", retry)).bind(judges)
        for j, section in zip(cfg.judges, judges) if cfg.layout == "split" else ():
            name = f"Judge_{j.name}"  # one judge sized and scaled on its own
            handles[name] = Panel.options(**j.deployment.options(name, retry)).bind([section], f"judge_{j.name}")
    ingress_spec = {
        "config": cfg.model_dump(mode="json"),
        "models": spec["models"],
        "style": spec["style"],
        "key_digest": spec["key_digest"],
    }
    ingress = m.deployment if cfg.layout == "single" else cfg.http.ingress
    return Ingress.options(**ingress.options("Ingress", retry, live=cfg.layout == "single")).bind(ingress_spec, handles)


def start(cfg: ServeConfig, *, name: str = APP_NAME) -> str:
    """Start Serve and deploy the app; the base URL once it is ready (`serve_driver.start`)."""
    return driver.start(cfg, build_app, name=name)


def serving(cfg: ServeConfig):
    """`with serving(cfg) as url:` the app runs inside the block (`serve_driver.serving`)."""
    return driver.serving(cfg, build_app)


def run(cfg: ServeConfig) -> None:
    """`caslie serve`: serve until interrupted (`serve_driver.run`)."""
    driver.run(cfg, build_app)


def main(argv: list[str] | None = None) -> int:
    return job_main("serve", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("serve"))
