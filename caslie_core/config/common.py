"""Config pieces every job shares: the strict base model, model references, pools, inputs and outputs."""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..models.chat import DATE_FORMAT, RESEARCH_DATE
from ..models.loading import DTYPES
from .base import StrictModel
from .engines import EngineChoice

Dtype = Literal[DTYPES]  # type: ignore[valid-type]


class InputConfig(StrictModel):
    path: str | list[str] = Field(
        description="records file(s) or folder: JSONL, JSON list or Parquet; local, s3://, http(s)://"
    )
    format: Literal["auto", "jsonl", "json", "parquet"] = Field(
        "auto", description="file format; auto reads it from the extension"
    )
    limit: int | None = Field(None, ge=1, description="process only the first N records (smoke runs)")
    on_duplicate_id: Literal["keep_first", "error"] = Field(
        "keep_first",
        description="an id the input repeats: keep_first keeps its first copy in input order and reports the ids; "
        "error does that too, then fails the job naming them",
    )


class DataInput(StrictModel):
    """`input` of the training and evaluation jobs: where the enriched (or raw) records are."""

    path: str | list[str] = Field(
        description="the enrichment output folder (reads its records/), its Parquet parts, or "
        "MMECInstruct-schema records (JSONL, JSON, Parquet); local or s3://"
    )


def moved_data_path(data: Any) -> Any:
    """`data.path` was the input's key before every job had `input.path`; accepted for one release."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict) or "path" not in data["data"]:
        return data
    data = {**data, "data": dict(data["data"])}
    old = data["data"].pop("path")
    if isinstance(data.get("input"), dict) and data["input"].get("path") not in (None, old):
        raise ValueError(f"data.path ({old!r}) is the old name of input.path ({data['input']['path']!r}): set one")
    warnings.warn(
        f"config key data.path is deprecated and will be removed in the next release: use input.path "
        f"(input.path={old!r} taken from data.path)",
        FutureWarning,
        stacklevel=2,
    )
    data["input"] = {**(data.get("input") or {}), "path": old}
    return data


class InputJobConfig(StrictModel):
    """Base of the jobs that read `input.path` and once read `data.path` (train, evaluate)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_data_path(cls, data):
        return moved_data_path(data)


class OutputConfig(StrictModel):
    path: str = Field(description="output folder (local or s3://); rerunning into it resumes")
    partition_by_task: bool = Field(True, description="write task=<name>/ sub-folders (Hive style)")
    rows_per_part: int = Field(
        4000,
        ge=1,
        description="records per write task (one Parquet part per task partition); fewer, bigger parts "
        "resume and list faster, smaller ones lose less work when a job is killed",
    )
    report_per_task: int = Field(
        8,
        ge=0,
        description="records per task shown in report.html (pictures, requests, captions, votes; read from the "
        "first parts of the output); 0 writes no report",
    )


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
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="how long the job waits for the cluster to offer one actor's resources (an autoscaler "
        "adding a GPU node takes minutes) before it fails naming the resource",
    )

    @model_validator(mode="after")
    def _sizes(self):
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        return self


FETCHER_OWN = {"user_agent"}  # `images.FetchPolicy` fields no config sets (the fetcher's own)


def fetch_policy(section) -> Any:
    """The `images.FetchPolicy` of a fetch config section: its fields, and what the side fixes (`FIXED`)."""
    import dataclasses

    from ..images import FetchPolicy

    names = {f.name for f in dataclasses.fields(FetchPolicy)} & set(type(section).model_fields)
    values = {**type(section).FIXED, **{n: getattr(section, n) for n in names}}
    if "schemes" in values:
        values["schemes"] = tuple(values["schemes"])
    if "allowlist" in values:
        values["allowlist"] = list(values["allowlist"])
    return FetchPolicy(**values)


class FetchRules(StrictModel):
    """The fetch settings, declared once for the batch job's section (`fetch`) and the service's (`fetch` of a
    Serve config). Each side states its own defaults (`DEFAULTS`: the service is stricter, on behalf of strangers)
    and what a config may not set there (`FIXED`: the service never reads local files); every field of
    `images.FetchPolicy` is one or the other (checked when a side is defined: none silently keeps the policy's
    default). `policy()` is the section's `images.FetchPolicy`."""

    DEFAULTS: ClassVar[dict] = {}
    FIXED: ClassVar[dict] = {}

    block_private: bool = Field(True, description="refuse loopback/private/link-local/metadata addresses")
    allowlist: list[str] = Field(default_factory=list, description="hosts or CIDRs exempt from block_private")
    pool: bool = Field(
        True, description="reuse keep-alive HTTP(S) connections per host and checked address (off: one per image)"
    )
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(20.0, gt=0, description="seconds of silence while reading before giving up")
    total_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds per image from the first attempt to giving up: retries, backoff, Retry-After "
        "waits and reading the body (bounds a server that drips bytes)",
    )
    retries: int = Field(3, ge=0, description="retries on transient errors (timeouts, 429, 5xx)")
    backoff: float = Field(0.5, ge=0, description="first backoff in seconds; doubles per retry")
    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="byte cap per image (URLs and data: URIs)")
    max_redirects: int = Field(5, ge=0, le=20, description="redirects followed per image (each one re-checked)")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        import dataclasses

        from ..images import FetchPolicy

        super().__pydantic_init_subclass__(**kwargs)
        if cls.DEFAULTS:
            for name, value in cls.DEFAULTS.items():
                cls.model_fields[name].default = value
            cls.model_rebuild(force=True)
        loose = {f.name for f in dataclasses.fields(FetchPolicy)} - set(cls.model_fields) - set(cls.FIXED)
        if loose - FETCHER_OWN:
            raise TypeError(f"{cls.__name__}: FetchPolicy fields neither configurable nor FIXED: {sorted(loose)}")

    def policy(self):
        return fetch_policy(self)


class FetchConfig(FetchRules):
    """The batch job's image fetching: your own catalog."""

    threads: int = Field(16, ge=1, le=256, description="concurrent fetches per fetch task (bounded concurrency)")
    schemes: list[Literal["http", "https", "s3", "gs", "az"]] = Field(
        default_factory=lambda: ["http", "https", "s3"], description="URL schemes allowed"
    )
    allow_local_files: bool = Field(True, description="allow plain paths and file:// (your own catalog)")


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


class ChatModelRef(ModelRef, EngineChoice):
    """A model asked through its chat template (the captioner, the judges), in our own actors (`engine: hf`) or on
    an OpenAI-compatible server (`engine: openai`)."""

    chat_date: str = Field(
        RESEARCH_DATE,
        description="the date a chat template writes where it writes one (Llama-3.x: 'Today Date: ...'); fixed so "
        "a prompt renders the same every day. Default: the research code's runs (Llama-3.1's default), "
        "format '%d %b %Y'",
    )

    @field_validator("chat_date")
    @classmethod
    def _chat_date(cls, v: str) -> str:
        from datetime import datetime

        try:
            datetime.strptime(v, DATE_FORMAT)
        except ValueError:
            raise ValueError(
                f"chat_date {v!r} is not a date like '{RESEARCH_DATE}' (day, abbreviated month, year)"
            ) from None
        return v


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_name(v: str) -> str:
    """Judge names appear in the output (each image's `votes[].judge`), responses (`images[].votes` keys) and
    metric labels: short, lower-case identifiers."""
    if not _NAME.match(v):
        raise ValueError(f"judge name {v!r} must match {_NAME.pattern}")
    return v


class RayConfig(StrictModel):
    address: str | None = Field(None, description="cluster address; default: RAY_ADDRESS, else a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster")
    object_store_memory: int | None = Field(None, ge=78643200, description="bytes for a local object store")
    progress_bars: bool | None = Field(
        None, description="Ray Data's progress display (bars on a terminal, log lines elsewhere); default on"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one JSON object per log line from the job's driver, Ray's workers (Ray's LoggingConfig) "
        "and Serve's replicas (Serve's logging_config), for a log collector",
    )


class JudgeBase(ChatModelRef):
    """One judge of the panel, in the batch job and in the service."""

    name: str = Field(description="short name: each vote's `judge` in the output, its key in responses")
    mode: Literal["logits", "generate"] = Field(
        "logits",
        description="logits: one forward pass, compare yes/no scores (fast); generate: as the "
        "research code, read the generated answer (slower, may answer neither)",
    )
    max_new_tokens: int = Field(16, ge=1, le=64, description="generate mode only")
    reply: Literal["strict", "research"] = Field(
        "strict",
        description="how a generated answer becomes a vote: strict = yes/no, anything else abstains; "
        "research = as the research code, the first three characters lower-cased (any string is a "
        "ballot of its own; generate mode only)",
    )
    system_message: str | None = Field(
        None,
        description="a system turn before the question, where the judge's chat template has a system "
        "role (left out where it has none); the research code used 'You are a helpful AI assistant.'",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _reply_needs_generate(self) -> JudgeBase:
        if self.reply == "research" and self.mode != "generate":
            raise ValueError(f"judge {self.name!r}: reply=research reads a generated answer; set mode=generate")
        return self


RESEARCH_CQE = {"mode": "generate", "reply": "research", "max_new_tokens": 16}


class CQEConfig(StrictModel):
    vote: Literal["strict", "research"] = Field(
        "strict",
        description="research: the paper's CQE (every judge generates up to 16 tokens after the system message "
        "'You are a helpful AI assistant.' where its chat template has a system role; its reply cut to 3 "
        "characters is a ballot; the most common ballot wins, ties to the first in the panel's order; kept "
        "iff the winner is yes; an empty or failed caption is judged as 'NA'). strict: yes/no answers "
        "(others abstain), kept iff yes outnumbers no; any judge mode, logits the fastest",
    )


def cqe_preset(cqe: CQEConfig, judges: list) -> None:
    """`cqe.vote: research` sets every judge to the research settings (the batch job's and the service's judges
    alike); a judge key set otherwise is an error naming it."""
    if cqe.vote != "research":
        return
    from ..models.judge import RESEARCH_SYSTEM

    wrong = [
        f"judges.{i}.{key}={getattr(j, key)!r} (the research preset needs {value!r})"
        for i, j in enumerate(judges)
        for key, value in RESEARCH_CQE.items()
        if key in j.model_fields_set and getattr(j, key) != value
    ]
    if wrong:
        raise ValueError(
            "cqe.vote=research conflicts with " + "; ".join(wrong) + ": remove those keys, or use cqe.vote=strict"
        )
    for j in judges:
        for key, value in RESEARCH_CQE.items():  # mode first: a research reply needs generate mode
            setattr(j, key, value)
        if "system_message" not in j.model_fields_set:
            j.system_message = RESEARCH_SYSTEM
