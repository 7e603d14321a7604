"""Job configuration: pydantic models (`extra="forbid"`), YAML files and dotted `--set` overrides.

`load_config(Model, path, ["a.b=c", ...])` reads the YAML, applies overrides and validates. Override
values follow the target field: a string field takes the text as typed (`--set captioner.revision=0123`),
other fields YAML 1.2 core-schema values (`optim.lr=1e-4` a float, `x=[1,2]` a list, `012` is 12, only
true/false are booleans: `no` reaches pydantic as the string "no"). Every problem is
reported at once, by dotted path, with what was expected and, for unknown keys, the valid names.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import types
from collections import abc
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema: only true/false are booleans, `012` is decimal, no dates."""

    yaml_implicit_resolvers: dict = {}


for _tag, _pattern, _first in [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?", "-+.0123456789"),
    ("float", r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+."),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
]:
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


def _int12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    base = {"0x": 16, "0o": 8, "0b": 2}.get(text[:2].lower(), 10)
    return int(text[2:] if base != 10 else text, base)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _int12)


def _members(tp: Any) -> list:
    """The alternatives of a (possibly Optional / Union / Annotated) type."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _child_type(tp: Any, part: str) -> Any:
    """The type of `part` (a field name, list index or dict key) inside a value of type `tp`; None if unknown."""
    for m in _members(tp):
        origin, args = get_origin(m), get_args(m)
        if _is_model(m) and part in m.model_fields:
            return m.model_fields[part].annotation
        if origin in (list, set, frozenset, abc.Sequence) and args and part.isdigit():
            return args[0]
        if origin is tuple and args and part.isdigit():
            return args[0] if args[-1] is Ellipsis else (args[int(part)] if int(part) < len(args) else None)
        if origin in (dict, abc.Mapping) and len(args) == 2:
            return args[1]
    return None


def _key_type(tp: Any) -> Any:
    for m in _members(tp):
        if _is_model(m):
            return str
        if get_origin(m) in (dict, abc.Mapping) and len(get_args(m)) == 2:
            return get_args(m)[0]
    return None


def _is_text(tp: Any) -> bool:
    """True when every scalar alternative of `tp` is a string (`str`, `str | None`, `str | list[str]`,
    `Literal["a", "b"]`): a plain value for it stays the text the user typed."""
    scalars = [
        m
        for m in _members(tp)
        if m is not type(None) and not _is_model(m) and get_origin(m) not in (list, set, frozenset, tuple, dict)
    ]
    return (
        tp is not None
        and bool(scalars)
        and all(
            (isinstance(m, type) and issubclass(m, str))
            or (get_origin(m) is Literal and all(isinstance(a, str) for a in get_args(m)))
            for m in scalars
        )
    )


def _build(loader: yaml.SafeLoader, node: yaml.Node, tp: Any) -> Any:
    """Python value of a composed YAML node, scalars typed by the target type `tp` (None: unknown)."""
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, _child_type(tp, str(i))) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = _build(loader, k, _key_type(tp))
            out[key] = _build(loader, v, _child_type(tp, str(key)))
        return out
    if node.style is None and _is_text(tp):  # plain (unquoted) scalar for a string field: the text itself
        takes_none = type(None) in _members(tp)
        return None if takes_none and node.tag.endswith(":null") else node.value
    return loader.construct_object(node, deep=True)


def parse_value(raw: str, tp: Any = None) -> Any:
    """An override's value: YAML 1.2 core-schema scalars and flow collections, typed by the target type `tp`.

    For a string field a plain value stays the text as typed (`revision=0123`, `name=no`); `null`/`~`/empty
    give None only where the field takes None. `[a, b]`/`{k: v}` are collections for every field; quote a
    value to keep it a string (`--set "name='[x]'"`)."""
    text = raw.strip()
    if _is_text(tp) and not text.startswith(("[", "{", "'", '"')):
        takes_none = type(None) in _members(tp)
        return None if takes_none and text in ("", "~", "null", "Null", "NULL") else text
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _build(loader, node, tp)
    except (yaml.YAMLError, TypeError):  # not YAML, or an unhashable key ({[a]: 1}): the text itself
        return raw
    finally:
        loader.dispose()


def parse_override(item: str, model: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value); with `model`, the value is typed by the field at `a.b`."""
    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. output.path=/tmp/out"])
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r}: empty key segment in {key!r}"])
    path = key.split(".")
    tp: Any = model
    for part in path:
        tp = _child_type(tp, part) if tp is not None else None
    return path, parse_value(raw, tp)


def apply_overrides(data: dict, overrides: list[str] | None, *, model: type[BaseModel] | None = None) -> dict:
    """Apply `a.b=c` overrides; a numeric segment indexes a list (`judges.0.mode=generate`).

    With `model` (the config's pydantic model) each value is typed by its target field (see `parse_value`)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item, model)
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
    """The `args` of our application in a Ray Serve config file (`applications: [{import_path, args}]`), with the
    file's `http_options`, `deployments:` and `logging_config` folded in as Serve applies them (`serve_file`)."""
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
    from .serve_file import fold_serve_file

    return fold_serve_file(data, apps[0], source=source)


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """YAML file (optional) + dotted overrides -> a validated config model.

    A Ray Serve config file (with `applications:`) contributes our application's `args`."""
    data = read_yaml(path) if path else {}
    if isinstance(data, dict) and "applications" in data:
        data = serve_app_args(data, source=str(path))
    if "input" in model.model_fields and "data" in model.model_fields:  # data.path became input.path
        from .common import moved_data_path

        data = moved_data_path(data)  # the file's old key, before the overrides: an explicit --set wins
        overrides = [_renamed(o, "data.path=", "input.path=") for o in overrides or []]
    data = apply_overrides(data, overrides, model=model)
    return validate_config(model, data, source=str(path) if path else None)


def _renamed(override: str, old: str, new: str) -> str:
    if not override.startswith(old):
        return override
    import warnings

    warnings.warn(
        f"config key {old[:-1]} is deprecated and will be removed in the next release: use {new[:-1]}",
        FutureWarning,
        stacklevel=3,
    )
    return new + override[len(old) :]


def config_hash(cfg: BaseModel) -> str:
    payload = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_resolved(cfg: BaseModel, folder: str) -> str:
    """Write the resolved config next to a job's output (`resolved_config.yaml`)."""
    import fsspec

    path = f"{folder.rstrip('/')}/resolved_config.yaml"
    with fsspec.open(path, "wt") as fh:
        yaml.safe_dump(cfg.model_dump(mode="json"), fh, sort_keys=False)
    return path
