"""`caslie serve` config: the arguments of the Serve application (`ray_jobs.serve:build_app`)."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import ChatModelRef, CQEConfig, Dtype, FetchRules, JudgeBase, RayConfig, StrictModel, cqe_preset

# What an adapter may be called: it becomes part of a model id (`BASE_ID:NAME`) and a folder of the adapter store
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AutoscalingSettings(StrictModel):
    """Ray Serve `autoscaling_config` of one deployment (replicas follow ongoing requests)."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0 = scale to zero: cold starts)")
    max_replicas: int = Field(1, ge=1, description="ceiling; each replica holds a model copy")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time (default: min)")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        description="requests in flight per replica the autoscaler aims for; lower = more replicas, lower latency",
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="load must last this long before scaling up")
    downscale_delay_s: float = Field(600.0, ge=0, description="idle this long before scaling down")
    look_back_period_s: float = Field(30.0, gt=0, description="window over which load is averaged")
    metrics_interval_s: float = Field(
        10.0, gt=0, description="how often replicas report load; keep it below look_back_period_s"
    )

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(
                f"metrics_interval_s ({self.metrics_interval_s}) must be < look_back_period_s "
                f"({self.look_back_period_s})"
            )
        return self

    def serve_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class BatchingSettings(StrictModel):
    """Dynamic request batching (`caslie_core.serving.gather.Gather`): the requests that queue while a model
    replica is busy share its next model call (as an LLM engine batches), up to `max_batch_size`."""

    enabled: bool = Field(True, description="off = one request per model call (for comparison)")
    max_batch_size: int = Field(8, ge=1, description="requests per model call; bigger = more throughput, more memory")
    wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="how long a request that finds the replica idle waits for others to share its model call "
        "(0: it starts at once, lowest latency); requests that arrive while the replica is busy always wait for it",
    )


class DeploymentSettings(StrictModel):
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (fractions share a core)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU)")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="replica bounds")
    batching: BatchingSettings = Field(default_factory=BatchingSettings, description="dynamic batching")
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica accepts at once")
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before callers get 503 + Retry-After (-1 = unbounded)"
    )
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between replica health checks")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a check slower than this fails the replica")

    def options(self, name: str, retry_after_s: float, *, live: bool = True) -> dict:
        """`Deployment.options(...)` keyword arguments; `live`: the deployment takes `user_config` (batching) in
        `reconfigure()` (the model deployments; not the ingress)."""
        options = {
            "name": name,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "autoscaling_config": self.autoscaling.serve_dict(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if live:  # applied by reconfigure() on running replicas, no restart
            options["user_config"] = {"batching": self.batching.model_dump()}
        return options


class ServeHttpConfig(StrictModel):
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0 exposes it: put auth on)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        10.0, gt=0, description="seconds to receive the whole request body (a trickling client gets 408)"
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="request headers larger than this get 431 (also limit them at the load balancer)",
    )
    allow_insecure: bool = Field(
        False, description="allow binding beyond loopback without an API key (never on a shared network)"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="per-request deadline (clients may ask for less with timeout_s); on expiry 504"
    )
    retry_after_s: float = Field(2.0, ge=0, description="Retry-After seconds sent with 503 when overloaded")
    api_key_env: str | None = Field(
        None,
        description="name of the environment variable holding the API key "
        "(never the key itself); unset = no auth (demo only)",
    )
    downstream_retries: int = Field(2, ge=0, description="retries of a model call whose replica died")
    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.25, batching=BatchingSettings(enabled=False)),
        description="the FastAPI ingress deployment (no model)",
    )

    @model_validator(mode="after")
    def _exposed_needs_a_key(self):
        if not is_loopback(self.host) and self.api_key_env is None and not self.allow_insecure:
            raise ValueError(
                f"http.host={self.host!r} serves beyond this machine without an API key: set http.api_key_env "
                "(the name of an environment variable holding the key), bind http.host: 127.0.0.1, or set "
                "http.allow_insecure: true to accept the risk"
            )
        return self


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServeFetchConfig(FetchRules):
    """Image fetching on behalf of clients: stricter than for a trusted catalog (shorter waits, fewer retries, a
    smaller byte cap, no local files ever)."""

    DEFAULTS: ClassVar[dict] = {
        "connect_timeout": 3.0,
        "read_timeout": 10.0,
        "total_timeout": 20.0,
        "retries": 1,
        "max_bytes": 10 * 1024 * 1024,
    }
    FIXED: ClassVar[dict] = {"allow_local_files": False}

    schemes: list[Literal["http", "https", "s3"]] = Field(
        default_factory=lambda: ["http", "https"], description="URL schemes clients may send"
    )
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard: max width*height")
    max_images: int = Field(16, ge=1, description="images per request")
    max_decoded_bytes: int = Field(
        160_000_000, ge=1_000_000, description="memory budget of one decoded image (header checked before decoding)"
    )
    threads: int = Field(32, ge=1, le=1024, description="fetch threads per ingress replica (their own pool)")
    decode_threads: int = Field(4, ge=1, le=64, description="decode threads per ingress replica")
    per_request: int = Field(4, ge=1, description="images one request fetches at a time")


class ServeCaptionerConfig(ChatModelRef):
    max_new_tokens: int = Field(128, ge=1, le=1024, description="caption length cap (method: 128)")
    image_size: int = Field(336, ge=8, description="images are letterboxed to this square")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")


class ServeJudgeConfig(JudgeBase):
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")


class ServeModelConfig(StrictModel):
    path: str | None = Field(
        None,
        description="the training job's output folder (served as it is), or a PEFT "
        "adapter folder; becomes the adapter named `name`",
    )
    model: str | None = Field(None, description="base model (hub id or path); default: the one recorded in path")
    revision: str | None = Field(None, description="base model revision")
    dtype: Dtype = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    prompt_style: Literal["auto", "alpaca", "mistral"] = Field("auto", description="as in evaluation")
    trust_remote_code: bool = Field(False, description="run model code from the hub (only for trusted repos)")
    name: str = Field(
        "caslie",
        description="the adapter name of `path`: its model id in the API is `BASE_ID:name` (Ray Serve LLM's "
        "convention), and `name` alone stays accepted",
    )
    base_id: str | None = Field(
        None,
        description="the base model's id in the API (/v1/models, `model` of requests); default: its Hugging "
        "Face id (a local folder: its name)",
    )
    adapter_store: str | None = Field(
        None,
        description="a folder (local or s3://) of PEFT adapters, one sub-folder each: `BASE_ID:SUBFOLDER` is "
        "served from it, loaded on first use (no redeploy for a new adapter)",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="more PEFT adapters served side by side, name -> folder (local or s3://); chosen per request",
    )
    serve_base: bool = Field(False, description="also answer with the base model alone (model id `base`)")
    max_adapters_per_replica: int = Field(4, ge=1, description="adapters kept loaded per replica (LRU)")
    max_new_tokens: int = Field(100, ge=1, le=2048, description="answer length cap (method: 100)")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are cut in the middle")
    prefix_cache: bool = Field(
        True,
        description="compute the key/value cache of the prompt template's head (the same in every request) once "
        "per adapter and reuse it: each prefill runs over the request's own tokens only",
    )
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")

    @model_validator(mode="after")
    def _names(self):
        if not self.path and not self.model:
            raise ValueError("set model.path (training output or adapter) or model.model")
        # without adapters the base model itself is served under `name`
        names = [self.name, *self.adapters]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError(f"model names must be unique and not 'base': {names}")
        bad = [n for n in names if not ADAPTER_NAME.match(n)]
        if bad:
            raise ValueError(f"model names {bad}: letters, digits, '.', '_' and '-' only (they become BASE_ID:NAME)")
        return self


class ServeConfig(StrictModel):
    """The arguments of the Serve application (`ray_jobs.serve:build_app`)."""

    http: ServeHttpConfig = Field(default_factory=ServeHttpConfig, description="HTTP and the ingress")
    model: ServeModelConfig
    captioner: ServeCaptionerConfig
    judges: list[ServeJudgeConfig] = Field(min_length=1, description="the judge panel (cqe: how its votes keep)")
    cqe: CQEConfig = Field(
        default_factory=CQEConfig, description="how the panel's answers become keep decisions, as in the batch job"
    )
    layout: Literal["split", "panel", "colocated", "single"] = Field(
        "split",
        description="where the models run. split: a deployment each (Captioner, Judge_<name>, Predictor), "
        "each sized and scaled alone (GPUs); panel: the judges together in one Panel deployment (one call per "
        "request for all votes); colocated: captioner, judges and predictor in one Models replica (small models: "
        "two calls per request instead of one per model), sized by model.deployment; single: the models inside "
        "the Ingress replica itself (no deployment call per request; small models on CPUs), which is then sized, "
        "scaled and batched by model.deployment (http.ingress does not apply)",
    )
    panel: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="the Panel deployment's replicas (layout: panel)"
    )
    fetch: ServeFetchConfig = Field(default_factory=ServeFetchConfig, description="client image fetching")
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection (caslie serve)")

    @model_validator(mode="after")
    def _unique_judges(self):
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique: {names}")
        cqe_preset(self.cqe, self.judges)  # research: every judge as the research code ran it
        return self
