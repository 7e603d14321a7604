"""Local paths made absolute where the driver reads its config, before anything reaches Ray.

A Ray worker's working directory is not the driver's (another node, or a cluster started in another folder),
so `--set input.path=demo-out/catalog/records.jsonl` would be read relative to the wrong folder. Outputs are
always local paths when they have no scheme; inputs and models only when they exist here (a hub id such as
`meta-llama/Llama-3.2-3B-Instruct` has no scheme either, and stays as it is).
"""

from __future__ import annotations

import os
from typing import Any

# (dotted key, kind): "out" is written (always a path), "in" is read (a path only if it exists here)
LOCAL_PATH_KEYS = {
    "EnrichConfig": [("input.path", "in"), ("output.path", "out")],
    "TrainConfig": [("input.path", "in"), ("model.model", "in"), ("run.storage_path", "out"), ("output.path", "out")],
    "EvaluateConfig": [("model.path", "in"), ("input.path", "in"), ("output.path", "out")],
    "ServeConfig": [("model.path", "in")],
}


def _is_local_relative(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(value)
        and "://" not in value
        and not value.startswith(("tiny:", "hf:", "~"))
        and not os.path.isabs(value)
    )


def absolute_local_paths(cfg: Any) -> dict[str, tuple[str, str]]:
    """Rewrite `cfg`'s relative local paths in place; return {key: (as given, absolute)}."""
    changed = {}
    for key, kind in LOCAL_PATH_KEYS.get(type(cfg).__name__, []):
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p, None)
        value = getattr(node, leaf, None) if node is not None else None
        if _is_local_relative(value) and (kind == "out" or os.path.exists(value)):
            setattr(node, leaf, os.path.abspath(value))
            changed[key] = (value, getattr(node, leaf))
    return changed
