"""`caslie train` config: enriched data in, a LoRA adapter (PEFT format) out."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import DataInput, InputJobConfig, ModelRef, RayConfig, StrictModel


class TrainModelConfig(ModelRef):
    prompt_style: Literal["auto", "alpaca", "mistral"] = Field(
        "auto", description="instruction prompt wrapping; auto = mistral for Mistral models, else alpaca"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")


class TrainDataConfig(StrictModel):
    train_split: str = Field("train", description="split used for training")
    eval_split: str = Field("val", description="split used for evaluation loss")
    tasks: list[str] | None = Field(None, description="only these tasks (abbreviations or names); default all")
    captions: Literal["auto", "kept", "all", "none"] = Field(
        "auto",
        description="captions written into the text: kept (the method: judged captions), all (every caption, "
        "no voting; raw records: their caption_info), none (each rendered as rejected); auto = kept for "
        "enrichment output, none for raw records",
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


class TrainConfig(InputJobConfig):
    """`caslie train`: enriched data in, a LoRA adapter (PEFT format) out."""

    model: TrainModelConfig
    input: DataInput = Field(description="where the records are (enrichment output or raw records)")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="splits, tasks and limits")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="evaluation loss")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings, description="checkpoints")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="workers")
    run: RunSettings
    output: TrainOutputConfig
    ray: RayConfig = Field(default_factory=RayConfig, description="cluster connection")
