"""Model ids of the embedded default: `tiny:NAME` names a model built offline on first use (the random tiny
models of `models.tiny`, the world's trained ones of `world.models`); any other id is a hub id or a path."""

from __future__ import annotations

from ..errors import UsageError
from ..world.models import WORLD_NAMES, ensure_world_models
from .tiny import TINY_NAMES, TINY_PREFIX, ensure_tiny_models


def resolve_model(model_id: str) -> str:
    """`tiny:NAME` -> the local folder (built on first use); anything else is returned unchanged."""
    if model_id.startswith(TINY_PREFIX):
        name = model_id[len(TINY_PREFIX) :]
        if name in WORLD_NAMES:  # trained on the synthetic world (caslie_core.world): seconds, once per cache
            return ensure_world_models()[name]
        if name not in TINY_NAMES:
            valid = ", ".join(TINY_PREFIX + n for n in (*TINY_NAMES, *WORLD_NAMES))
            raise UsageError(f"unknown tiny model {model_id!r}; valid: {valid}")
        return ensure_tiny_models()[name]
    return model_id
