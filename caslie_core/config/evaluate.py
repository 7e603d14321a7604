"""`caslie evaluate` config: batch inference on the test splits, metrics, ablations, table and chart."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import DataInput, Dtype, InputJobConfig, PoolConfig, RayConfig, StrictModel


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
    splits: list[str] = Field(
        default_factory=lambda: ["test", "ood_test"], description="splits to evaluate (IND test and OOD test)"
    )
    tasks: list[str] | None = Field(None, description="only these tasks; default all")
    limit: int | None = Field(None, ge=1, description="first N records per run (smoke runs)")


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(100, ge=1, le=1024, description="answer length cap (method: 100)")
    micro_batch: int = Field(16, ge=1, description="prompts per generate() call")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are cut in the middle, as in training")
    prefix_cache: bool = Field(
        True, description="reuse the key/value cache of the prompt template's head (the same in every prompt)"
    )


class EvalOutputConfig(StrictModel):
    path: str = Field(description="predictions-<ablation>.jsonl, results.{json,md,png}, summary.json")
    paper_rows: list[Literal["CASLIE-M", "CASLIE-S", "CASLIE-L", "best baseline"]] = Field(
        default_factory=lambda: ["CASLIE-M"], description="the paper's rows printed beside ours"
    )


class EvaluateConfig(InputJobConfig):
    """`caslie evaluate`: batch inference on the test splits, per-task metrics, ablations, table and chart."""

    model: EvalModelConfig
    input: DataInput = Field(description="where the records are (enrichment output or raw records)")
    data: EvalDataConfig = Field(default_factory=EvalDataConfig, description="splits, tasks and limits")
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
