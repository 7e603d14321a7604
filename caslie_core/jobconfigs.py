"""Typed configs of the jobs. Every field says what it does and what it trades off."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .config import StrictModel
from .modeling import DTYPES

Dtype = Literal[DTYPES]  # type: ignore[valid-type]


class InputConfig(StrictModel):
    path: str | list[str] = Field(
        description="records file(s) or folder: JSONL, JSON list or Parquet; local, s3://, http(s)://"
    )
    format: Literal["auto", "jsonl", "json", "parquet"] = Field(
        "auto", description="file format; auto reads it from the extension"
    )
    limit: int | None = Field(None, ge=1, description="process only the first N records (smoke runs)")


class OutputConfig(StrictModel):
    path: str = Field(description="output folder (local or s3://); rerunning into it resumes")
    partition_by_task: bool = Field(True, description="write task=<name>/ sub-folders (Hive style)")


class PoolConfig(StrictModel):
    min_size: int = Field(1, ge=1, description="actors kept alive; more = less cold start on bursts")
    max_size: int = Field(1, ge=1, description="autoscaling ceiling; each actor holds a model copy")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (0 = CPU); fractions share a GPU")
    num_cpus: float = Field(1, gt=0, description="CPUs per actor")
    batch_size: int = Field(
        8,
        ge=1,
        description="rows per Ray batch handed to an actor; bigger = better GPU use, more memory and coarser retries",
    )

    @model_validator(mode="after")
    def _sizes(self):
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        return self


class FetchConfig(StrictModel):
    threads: int = Field(16, ge=1, le=256, description="concurrent fetches per fetch task (bounded concurrency)")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(20.0, gt=0, description="seconds of silence while reading before giving up")
    retries: int = Field(3, ge=0, description="retries on transient errors (timeouts, 429, 5xx)")
    backoff: float = Field(0.5, ge=0, description="first backoff in seconds; doubles per retry")
    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="byte cap per image")
    schemes: list[Literal["http", "https", "s3", "gs", "az"]] = Field(
        default_factory=lambda: ["http", "https", "s3"], description="URL schemes allowed"
    )
    allow_local_files: bool = Field(True, description="allow plain paths and file:// (your own catalog)")
    block_private: bool = Field(True, description="refuse loopback/private/link-local/metadata addresses")
    allowlist: list[str] = Field(default_factory=list, description="hosts or CIDRs exempt from block_private")

    def policy(self):
        from .images import FetchPolicy

        return FetchPolicy(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_bytes=self.max_bytes,
            retries=self.retries,
            backoff=self.backoff,
            schemes=tuple(self.schemes),
            allow_local_files=self.allow_local_files,
            block_private=self.block_private,
            allowlist=list(self.allowlist),
        )


class DecodeConfig(StrictModel):
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard: max width*height")
    image_size: int = Field(
        336,
        ge=8,
        description="images are letterboxed to this square before captioning; match the captioner's input size",
    )


class ModelRef(StrictModel):
    model: str = Field(description="Hugging Face model id or local path (`tiny:NAME` for the offline tiny models)")
    revision: str | None = Field(None, description="commit hash or tag to pin (recommended for hub models)")
    dtype: Dtype = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    trust_remote_code: bool = Field(False, description="run model code from the hub (only for trusted repos)")


class CaptionerConfig(ModelRef):
    max_new_tokens: int = Field(128, ge=1, le=1024, description="caption length cap (method: 128)")
    micro_batch: int = Field(8, ge=1, description="images per generate() call inside an actor")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="captioner actor pool")


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class JudgeConfig(ModelRef):
    name: str = Field(description="short name, used in column names (votes_<name>)")
    mode: Literal["logits", "generate"] = Field(
        "logits",
        description="logits: one forward pass, compare yes/no scores (fast); generate: as the "
        "research code, read the generated answer (slower, may answer neither)",
    )
    max_new_tokens: int = Field(16, ge=1, le=64, description="generate mode only")
    micro_batch: int = Field(16, ge=1, description="questions per forward/generate call")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="judge actor pool")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"judge name {v!r} must match {_NAME.pattern}")
        return v


class DedupConfig(StrictModel):
    enabled: bool = Field(True, description="caption each (image content, request) pair once per run")
    claim_ttl_s: float = Field(
        600.0, gt=0, description="seconds before another actor may redo a pair whose claimant went silent"
    )
    max_entries: int = Field(2_000_000, ge=1000, description="cache size cap (captions kept in memory)")


class LimitsConfig(StrictModel):
    max_failed_fraction: float = Field(
        1.0, ge=0, le=1, description="fail the job when failed records / records exceed this (1.0 = never)"
    )
    min_records: int = Field(100, ge=1, description="records seen before the fraction is checked")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="cluster address; default: RAY_ADDRESS, else a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster")
    object_store_memory: int | None = Field(None, ge=78643200, description="bytes for a local object store")
    progress_bars: bool | None = Field(None, description="default: on a terminal, off in CI")


class EnrichConfig(StrictModel):
    """`caslie enrich`: records in, captions + votes + enriched instruction data out."""

    input: InputConfig
    output: OutputConfig
    fetch: FetchConfig = Field(default_factory=FetchConfig, description="image fetching")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="image decoding")
    captioner: CaptionerConfig
    judges: list[JudgeConfig] = Field(min_length=1, description="the judge panel; plurality of yes keeps")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="caption de-duplication")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="error-rate limit")
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection")
    records_per_batch: int = Field(16, ge=1, description="records per CPU task batch (fetch, decode, write)")

    @model_validator(mode="after")
    def _unique_judges(self):
        names = [j.name for j in self.judges]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"judge names must be unique; repeated: {dupes}")
        return self


# ------------------------------------------------------------------------------------------- train


class TrainModelConfig(ModelRef):
    prompt_style: Literal["auto", "alpaca", "mistral"] = Field(
        "auto", description="instruction prompt wrapping; auto = mistral for Mistral models, else alpaca"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")


class TrainDataConfig(StrictModel):
    path: str | list[str] = Field(
        description="the enrichment output folder (reads its records/), its Parquet "
        "parts, or MMECInstruct-schema files (JSONL, JSON, Parquet); "
        "local or s3://"
    )
    train_split: str = Field("train", description="split used for training")
    eval_split: str = Field("val", description="split used for evaluation loss")
    tasks: list[str] | None = Field(None, description="only these tasks (abbreviations or names); default all")
    use_enriched: bool = Field(
        True, description="train on the enriched input (false: the original text, the text-only ablation)"
    )
    max_length: int = Field(
        2048, ge=16, description="tokens per example; longer ones are cut in the middle of the prompt and counted"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N training rows (smoke runs)")
    shuffle_buffer: int = Field(1000, ge=0, description="rows in each worker's local shuffle buffer (0 = off)")
    materialize: bool = Field(
        True,
        description="tokenize once and keep the tokens in the object store for all "
        "epochs and evaluations (MMECInstruct-size data: ~1 GB); false "
        "streams and re-tokenizes each pass (catalog-size data)",
    )


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, description="LoRA rank (method: 16)")
    alpha: int = Field(16, ge=1, description="LoRA alpha; the update is scaled by alpha/r (method: 16)")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout (method: 0.1)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names to adapt (method: all attention and MLP projections)",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="modules trained in full and saved with the adapter (e.g. lm_head for a model with a random head)",
    )


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0, description="peak learning rate (method: 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps warming up (method: 5%)")
    epochs: int = Field(1, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch per worker")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step; effective batch = "
        "batch_size x grad_accum x workers (method: 128)",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    seed: int = Field(0, description="seed for LoRA init, dropout and shuffling")


class EvalSettings(StrictModel):
    every_steps: int = Field(0, ge=0, description="evaluation loss every N steps (0 = only at the end)")
    max_batches: int | None = Field(None, ge=1, description="cap evaluation batches per worker")
    enabled: bool = Field(True, description="compute evaluation loss on eval_split")


class CheckpointSettings(StrictModel):
    every_steps: int = Field(100, ge=1, description="checkpoint interval in optimizer steps (and at the end)")
    keep: int = Field(2, ge=1, description="checkpoints kept (the newest)")


class ScalingSettings(StrictModel):
    num_workers: int = Field(1, ge=1, description="training workers (data parallel)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; otherwise CPU and gloo")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra custom resources per worker (e.g. accelerator_type:H100: 0.001)"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: full replica per worker; fsdp: shard parameters across workers (large bases)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how workers are placed on nodes (Ray placement group strategy): PACK keeps them on "
        "as few nodes as fit (fast collectives); SPREAD puts them on different nodes when it can",
    )


class RunSettings(StrictModel):
    name: str | None = Field(
        None,
        description="run name; rerunning with the same name resumes from its latest "
        "checkpoint (default: derived from the config hash)",
    )
    storage_path: str = Field(description="where Ray Train keeps checkpoints: local folder or s3://")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1 = unlimited)")


class TrainOutputConfig(StrictModel):
    path: str = Field(description="final adapter, tokenizer, summary.json, resolved config (local or s3://)")
    merge: bool = Field(False, description="also write the base model with the adapter merged in (full size)")


class TrainConfig(StrictModel):
    """`caslie train`: enriched data in, a LoRA adapter (PEFT format) out."""

    model: TrainModelConfig
    data: TrainDataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="evaluation loss")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings, description="checkpoints")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="workers")
    run: RunSettings
    output: TrainOutputConfig
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection")


# ---------------------------------------------------------------------------------------- evaluate


class EvalModelConfig(StrictModel):
    path: str | None = Field(
        None,
        description="the training job's output folder (adapter/ + resolved config), "
        "or a PEFT adapter folder; the base model is read from it",
    )
    model: str | None = Field(
        None,
        description="base or merged model (hub id or path; `tiny:lm`); with `path` "
        "it overrides the base model recorded there",
    )
    revision: str | None = Field(None, description="base model revision")
    dtype: Dtype = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    prompt_style: Literal["auto", "alpaca", "mistral"] = Field(
        "auto", description="auto = the training run's style, else mistral for Mistral models, else alpaca"
    )
    trust_remote_code: bool = Field(False, description="run model code from the hub (only for trusted repos)")

    @model_validator(mode="after")
    def _one(self):
        if not self.path and not self.model:
            raise ValueError("set model.path (training output or adapter) or model.model (a model id or path)")
        return self


class EvalDataConfig(StrictModel):
    path: str | list[str] = Field(
        description="enrichment output folder or its parts, or MMECInstruct-schema "
        "records (JSONL, JSON, Parquet); local or s3://"
    )
    splits: list[str] = Field(
        default_factory=lambda: ["test", "ood_test"], description="splits to evaluate (IND test and OOD test)"
    )
    tasks: list[str] | None = Field(None, description="only these tasks; default all")
    limit: int | None = Field(None, ge=1, description="first N records per run (smoke runs)")


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(100, ge=1, le=1024, description="answer length cap (method: 100)")
    micro_batch: int = Field(16, ge=1, description="prompts per generate() call")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are cut in the middle, as in training")


class EvalOutputConfig(StrictModel):
    path: str = Field(description="predictions-<ablation>.jsonl, results.{json,md,png}, summary.json")
    paper_rows: list[Literal["CASLIE-M", "CASLIE-S", "CASLIE-L", "best baseline"]] = Field(
        default_factory=lambda: ["CASLIE-M"], description="the paper's rows printed beside ours"
    )


class EvaluateConfig(StrictModel):
    """`caslie evaluate`: batch inference on the test splits, per-task metrics, ablations, table and chart."""

    model: EvalModelConfig
    data: EvalDataConfig
    ablations: list[Literal["kept", "none", "all"]] = Field(
        default_factory=lambda: ["kept"],
        min_length=1,
        description="kept = the method (judged captions); none = text only; all = every caption, no voting",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="greedy decoding")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="inference actor pool")
    output: EvalOutputConfig
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection")

    @field_validator("ablations")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"ablations repeat: {v}")
        return v


# ------------------------------------------------------------------------------------------- serve


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
    """Dynamic request batching (`@serve.batch`): requests arriving together share one model call."""

    enabled: bool = Field(True, description="off = one request per model call (for comparison)")
    max_batch_size: int = Field(8, ge=1, description="requests per model call; bigger = more throughput, more memory")
    wait_timeout_s: float = Field(0.01, ge=0, description="how long a first request waits for company")


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

    def options(self, name: str, retry_after_s: float) -> dict:
        """`Deployment.options(...)` keyword arguments."""
        return {
            "name": name,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "autoscaling_config": self.autoscaling.serve_dict(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }


class ServeHttpConfig(StrictModel):
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0 exposes it: put auth on)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
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


class ServeFetchConfig(StrictModel):
    """Image fetching on behalf of clients: stricter than for a trusted catalog."""

    schemes: list[Literal["http", "https", "s3"]] = Field(
        default_factory=lambda: ["http", "https"], description="URL schemes clients may send"
    )
    connect_timeout: float = Field(3.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(10.0, gt=0, description="seconds of silence while reading")
    retries: int = Field(1, ge=0, description="retries on transient errors")
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="byte cap per image (URLs and data: URIs)")
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard: max width*height")
    max_images: int = Field(16, ge=1, description="images per request")
    block_private: bool = Field(True, description="refuse loopback/private/link-local/metadata addresses")
    allowlist: list[str] = Field(default_factory=list, description="hosts or CIDRs exempt from block_private")

    def policy(self):
        from .images import FetchPolicy

        return FetchPolicy(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_bytes=self.max_bytes,
            retries=self.retries,
            schemes=tuple(self.schemes),
            allow_local_files=False,
            block_private=self.block_private,
            allowlist=list(self.allowlist),
        )


class ServeCaptionerConfig(ModelRef):
    max_new_tokens: int = Field(128, ge=1, le=1024, description="caption length cap (method: 128)")
    image_size: int = Field(336, ge=8, description="images are letterboxed to this square")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")


class ServeJudgeConfig(ModelRef):
    name: str = Field(description="short name, shown in responses")
    mode: Literal["logits", "generate"] = Field("logits", description="see the enrichment job")
    max_new_tokens: int = Field(16, ge=1, le=64, description="generate mode only")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")

    _check_name = field_validator("name")(JudgeConfig._name.__func__)


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
    name: str = Field("caslie", description="model id of `path` in the API (/v1/models, `model` of requests)")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="more PEFT adapters served side by side, name -> folder (local or s3://); chosen per request",
    )
    serve_base: bool = Field(False, description="also answer with the base model alone (model id `base`)")
    max_adapters_per_replica: int = Field(4, ge=1, description="adapters kept loaded per replica (LRU)")
    max_new_tokens: int = Field(100, ge=1, le=2048, description="answer length cap (method: 100)")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are cut in the middle")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="replicas")

    @model_validator(mode="after")
    def _names(self):
        if not self.path and not self.model:
            raise ValueError("set model.path (training output or adapter) or model.model")
        # without adapters the base model itself is served under `name`
        names = [self.name, *self.adapters]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError(f"model names must be unique and not 'base': {names}")
        return self


class ServeConfig(StrictModel):
    """The arguments of the Serve application (`ray_jobs.serve:build_app`)."""

    http: ServeHttpConfig = Field(default_factory=ServeHttpConfig, description="HTTP and the ingress")
    model: ServeModelConfig
    captioner: ServeCaptionerConfig
    judges: list[ServeJudgeConfig] = Field(min_length=1, description="the judge panel; plurality of yes keeps")
    fetch: ServeFetchConfig = Field(default_factory=ServeFetchConfig, description="client image fetching")
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection (caslie serve)")

    @model_validator(mode="after")
    def _unique_judges(self):
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique: {names}")
        return self


JOB_CONFIGS = {"enrich": EnrichConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "serve": ServeConfig}


def config_model_for(path: str) -> type[StrictModel]:
    """configs/<job>-<setting>.yaml -> that job's config model."""
    from pathlib import Path

    job = Path(path).name.split("-", 1)[0]
    if job not in JOB_CONFIGS:
        raise KeyError(f"no job named {job!r} for {path}; config names start with one of {sorted(JOB_CONFIGS)}")
    return JOB_CONFIGS[job]
