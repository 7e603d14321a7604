"""Job configuration: one pydantic model per job, YAML files and dotted `--set` overrides.

    from caslie_core.config import EnrichConfig, load_config
    cfg = load_config(EnrichConfig, "configs/enrich-demo.yaml", ["output.path=/tmp/out"])

`loading` reads YAML, applies overrides and formats every problem at once; `common` holds the pieces
every job shares (`input`, `output`, model references, pools, the Ray connection); one module per job.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    DecodeConfig,
    FetchConfig,
    InputConfig,
    ModelRef,
    OutputConfig,
    PoolConfig,
    RayConfig,
    StrictModel,
)
from .enrich import CaptionerConfig, EnrichConfig, JudgeConfig
from .evaluate import EvaluateConfig, GenerationConfig
from .loading import (
    apply_overrides,
    config_hash,
    format_errors,
    load_config,
    read_yaml,
    validate_config,
    write_resolved,
)
from .serve import ServeConfig
from .train import TrainConfig

JOB_CONFIGS: dict[str, type[StrictModel]] = {
    "enrich": EnrichConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "serve": ServeConfig,
}


def config_model_for(path: str) -> type[StrictModel]:
    """configs/<job>-<setting>.yaml -> that job's config model."""
    job = Path(path).name.split("-", 1)[0]
    if job not in JOB_CONFIGS:
        raise KeyError(f"no job named {job!r} for {path}; config names start with one of {sorted(JOB_CONFIGS)}")
    return JOB_CONFIGS[job]


__all__ = [
    "JOB_CONFIGS",
    "CaptionerConfig",
    "DecodeConfig",
    "EnrichConfig",
    "EvaluateConfig",
    "FetchConfig",
    "GenerationConfig",
    "InputConfig",
    "JudgeConfig",
    "ModelRef",
    "OutputConfig",
    "PoolConfig",
    "RayConfig",
    "ServeConfig",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "config_model_for",
    "format_errors",
    "load_config",
    "read_yaml",
    "validate_config",
    "write_resolved",
]
