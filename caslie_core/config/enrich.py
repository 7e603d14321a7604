"""`caslie enrich` config: records in, captions + votes + enriched instruction data out."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import (
    ChatModelRef,
    CQEConfig,
    DecodeConfig,
    FetchConfig,
    InputConfig,
    JudgeBase,
    OutputConfig,
    PoolConfig,
    RayConfig,
    StrictModel,
    cqe_preset,
)


class CaptionerConfig(ChatModelRef):
    model: str | None = Field(
        None, description="Hugging Face model id or local path (`tiny:NAME` offline); needed when source is model"
    )
    source: Literal["model", "record"] = Field(
        "model",
        description="model: caption every image with the captioner pool; record: take each image's caption from "
        "the record's caption_info (the released MMECInstruct captions; no images fetched, no captioner pool), "
        "then judge them",
    )
    max_new_tokens: int = Field(128, ge=1, le=1024, description="caption length cap (method: 128)")
    micro_batch: int = Field(8, ge=1, description="images per generate() call inside an actor")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="captioner actor pool")

    @model_validator(mode="after")
    def _server_needs_no_gpu(self):
        return no_gpu_for_a_server(self, "captioner")

    @model_validator(mode="after")
    def _model_when_captioning(self):
        if self.source == "model" and not self.model:
            raise ValueError(
                "captioner.model is required when captioner.source is model (the default); set a model id, or "
                "captioner.source: record to use the records' caption_info"
            )
        return self


class JudgeConfig(JudgeBase):
    micro_batch: int = Field(16, ge=1, description="questions per forward/generate call")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="judge actor pool")

    @model_validator(mode="after")
    def _server_needs_no_gpu(self):
        return no_gpu_for_a_server(self, f"judges ({self.name})")


def no_gpu_for_a_server(section, what: str):
    """An `engine: openai` pool calls a server: its actors reserve CPUs only."""
    if section.engine == "openai" and section.pool.num_gpus:
        raise ValueError(
            f"{what}.pool.num_gpus={section.pool.num_gpus:g}: an engine: openai pool calls its server and holds no "
            f"model; set {what}.pool.num_gpus: 0 (size the server's GPUs instead)"
        )
    return section


class DedupConfig(StrictModel):
    enabled: bool = Field(True, description="caption each (image content, request) pair once per run")
    claim_ttl_s: float = Field(
        600.0, gt=0, description="seconds before another actor may redo a pair whose claimant went silent"
    )
    max_entries: int = Field(2_000_000, ge=1000, description="cache size cap (captions kept in memory)")


class StoreConfig(StrictModel):
    """The result store (`caslie_core.io.results`): captions and votes kept across runs, keyed by image content,
    request and model, so a refreshed catalog's rerun runs only what changed through the models."""

    path: str | None = Field(
        None, description="folder of the store, local or any fsspec URL (s3://...); none: every run computes all"
    )
    mode: Literal["read_write", "read_only", "write_only", "off"] = Field(
        "read_write",
        description="read_write: stored results are used and new ones stored; read_only: used, nothing written; "
        "write_only: everything computed and stored (a store built afresh); off: the store is not touched",
    )
    shards: int = Field(
        1, ge=1, le=256, description="lookup actors the stored keys are spread over (about 1M keys per actor)"
    )

    @model_validator(mode="after")
    def _mode_needs_a_path(self):
        if "mode" in self.model_fields_set and self.mode != "off" and not self.path:
            raise ValueError(
                f"store.mode={self.mode} without store.path: set store.path to the store's folder (local or an "
                "fsspec URL such as s3://bucket/caslie-store), or leave store.mode unset"
            )
        return self

    @property
    def reads(self) -> bool:
        return bool(self.path) and self.mode in ("read_write", "read_only")

    @property
    def writes(self) -> bool:
        return bool(self.path) and self.mode in ("read_write", "write_only")


class LimitsConfig(StrictModel):
    max_failed_fraction: float = Field(
        1.0, ge=0, le=1, description="fail the job when failed records / records exceed this (1.0 = never)"
    )
    min_records: int = Field(100, ge=1, description="records seen before the fraction is checked")


class EnrichConfig(StrictModel):
    """`caslie enrich`: records in, captions + votes + enriched instruction data out."""

    input: InputConfig
    output: OutputConfig
    fetch: FetchConfig = Field(default_factory=FetchConfig, description="image fetching")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="image decoding")
    captioner: CaptionerConfig
    judges: list[JudgeConfig] = Field(min_length=1, description="the judge panel, in order (the order breaks ties)")
    cqe: CQEConfig = Field(default_factory=CQEConfig, description="how the panel's answers become keep decisions")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="caption de-duplication")
    store: StoreConfig = Field(default_factory=StoreConfig, description="captions and votes kept across runs")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="error-rate limit")
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection")
    model_pools: Literal["split", "shared"] = Field(
        "split",
        description="split: a captioner pool and a pool per judge, overlapping on a batch stream (GPUs: each "
        "model on its own devices); shared: one pool, sized by captioner.pool, whose actors hold the captioner "
        "and every judge and run them in turn on each batch (one GPU, or a few CPU cores where processes would "
        "fight over them; the judges' pool settings are then unused, with a warning)",
    )
    records_per_batch: int = Field(
        16, ge=1, description="records per fetch+decode task (its images are fetched at once)"
    )
    task_num_cpus: float = Field(
        1.0,
        gt=0,
        le=64,
        description="CPUs Ray reserves per CPU task (read, fetch+decode, write); below 1 lets a small machine "
        "read, prepare and write while the actor pools hold their CPUs (a one-file catalog's read task holds its "
        "CPU until the file is read: with too few left for a fetch task, the job waits forever)",
    )
    progress_interval_s: float = Field(
        30.0, ge=0, description="seconds between progress lines when the output is not a terminal (0 = none)"
    )
    progress_stall_s: float = Field(
        60.0,
        ge=0,
        description="after this many seconds with records read but no batch at a model pool, or no row moving at "
        "all, the job says which operator holds the rows and what Ray Data says it waits for (again every as many "
        "seconds while it lasts; 0 = never). Loading a big model takes minutes: raise it rather than read noise",
    )

    def model_pools_used(self) -> list[tuple[str, PoolConfig]]:
        """(config key, pool) of each model pool the job starts: the captioner's (it runs every model when
        `model_pools: shared`; none when captions come from the records and pools are split), a judge's each."""
        pools = []
        if self.model_pools == "shared" or self.captioner.source == "model":
            pools.append(("captioner.pool", self.captioner.pool))
        if self.model_pools != "shared":
            pools += [(f"judges.{i}.pool", j.pool) for i, j in enumerate(self.judges)]
        return pools

    @model_validator(mode="after")
    def _unique_judges(self):
        names = [j.name for j in self.judges]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"judge names must be unique; repeated: {dupes}")
        return self

    @model_validator(mode="after")
    def _shared_pool(self):
        """A shipped config's judge pools stay valid under `--set model_pools=shared`; they are said to be unused."""
        unused = [f"judges.{i}.pool" for i, j in enumerate(self.judges) if "pool" in j.model_fields_set]
        if self.model_pools == "shared" and unused:
            import warnings

            warnings.warn(
                f"model_pools=shared runs every judge in the captioner's pool: {', '.join(unused)} not used "
                "(size captioner.pool instead)",
                stacklevel=2,
            )
        return self

    @model_validator(mode="after")
    def _cqe_preset(self):
        """`cqe.vote: research` sets every judge to the research settings; one set otherwise is an error."""
        cqe_preset(self.cqe, self.judges)
        return self
