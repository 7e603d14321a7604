"""Job configuration: pydantic models (`extra="forbid"`), YAML files and dotted `--set` overrides.

`load_config(Model, path, ["a.b=c", ...])` reads the YAML, applies overrides (values parsed as YAML,
so `--set train.lr=1e-4` is a float and `--set x=[1,2]` a list) and validates. Every problem is
reported at once, by dotted path, with what was expected and, for unknown keys, the valid names.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. output.path=/tmp/out"])
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r}: empty key segment in {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b=c` overrides; a numeric segment indexes a list (`judges.0.mode=generate`)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        [
                            f"override {item!r}: {'.'.join(path[:depth]) or 'list'} has "
                            f"{len(node)} item(s); {part!r} is not a valid index"
                        ]
                    )
                key: Any = int(part)
            else:
                key = part
                if not last and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return out


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Valid field names of the model at `loc`'s parent (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # unwrap Optional[...] / X | None and dict/list containers of models
        args = getattr(current, "__args__", None)
        if args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[-1] if models else current
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def format_errors(model: type[BaseModel], err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
            problems.append(f"{path}: unknown key{hint}")
        elif e["type"] == "missing":
            problems.append(f"{path}: required, missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {msg}{shown}")
    return problems


def validate_config(model: type[M], data: dict, *, source: str | None = None) -> M:
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping at the top level, got {type(data).__name__}"], source=source)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(model, e), source=source) from None


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source=str(p)) from None
    return data or {}


SERVE_IMPORT_PATH = "ray_jobs.serve:build_app"


def serve_app_args(data: dict, *, source: str | None = None) -> dict:
    """The `args` of our application in a Ray Serve config file (`applications: [{import_path, args}]`)."""
    apps = [
        a for a in data.get("applications") or [] if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH
    ]
    if len(apps) != 1:
        raise ConfigError(
            [
                f"a Serve config file needs exactly one application with import_path "
                f"{SERVE_IMPORT_PATH}; found {len(apps)}"
            ],
            source=source,
        )
    return apps[0].get("args") or {}


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """YAML file (optional) + dotted overrides -> a validated config model.

    A Ray Serve config file (with `applications:`) contributes our application's `args`."""
    data = read_yaml(path) if path else {}
    if isinstance(data, dict) and "applications" in data:
        data = serve_app_args(data, source=str(path))
    data = apply_overrides(data, overrides)
    return validate_config(model, data, source=str(path) if path else None)


def config_hash(cfg: BaseModel) -> str:
    payload = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_resolved(cfg: BaseModel, folder: str) -> str:
    """Write the resolved config next to a job's output (`resolved_config.yaml`)."""
    import fsspec
    import yaml

    path = f"{folder.rstrip('/')}/resolved_config.yaml"
    with fsspec.open(path, "wt") as fh:
        yaml.safe_dump(cfg.model_dump(mode="json"), fh, sort_keys=False)
    return path
