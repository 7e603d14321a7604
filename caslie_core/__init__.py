"""CASLIE core: the Ray-free library behind every job and the service.

Shared nouns sit at the top (`tasks`, `records`, `prompts`, `images`, `errors`, `synthetic`); each stage
has a package (`io`, `config`, `models`, `enrichment`, `training`, `evaluation`, `serving`). The names
below are the public surface; they load on first use, so `import caslie_core` stays light (no Ray,
torch, transformers or pyarrow).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    # records and tasks
    "Record": "caslie_core.records",
    "Reject": "caslie_core.records",
    "parse_record": "caslie_core.records",
    "Task": "caslie_core.tasks",
    "TASKS": "caslie_core.tasks",
    "get_task": "caslie_core.tasks",
    "load_records": "caslie_core.io.sources",
    "iter_records": "caslie_core.io.sources",
    # configuration
    "load_config": "caslie_core.config",
    "EnrichConfig": "caslie_core.config",
    "TrainConfig": "caslie_core.config",
    "EvaluateConfig": "caslie_core.config",
    "ServeConfig": "caslie_core.config",
    # models
    "Captioner": "caslie_core.models.captioner",
    "Judge": "caslie_core.models.judge",
    "Predictor": "caslie_core.models.predictor",
    "AdapterPredictor": "caslie_core.models.predictor",
    # the method's steps
    "assemble": "caslie_core.enrichment.assemble",
    "run_local": "caslie_core.enrichment.pipeline",
    "LoRARecipe": "caslie_core.training.recipe",
    "score_task": "caslie_core.evaluation.metrics",
    # errors
    "CaslieError": "caslie_core.errors",
    "ConfigError": "caslie_core.errors",
    "ImageError": "caslie_core.errors",
    "RecordError": "caslie_core.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'caslie_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
