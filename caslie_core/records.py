"""MMECInstruct records: reading (JSONL, JSON list, Parquet; any fsspec URL), validation and ids.

A raw row becomes a `Record` through `parse_record`, which either returns a fully checked record or
raises a `RecordError` naming the row, id and field. `iter_records` streams a file in one of two
modes: strict (raise on the first bad row) or collecting (yield `Reject`s beside the records so a
job can account for every input row).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RecordError, UsageError
from .tasks import OPTION_LETTERS, Task, get_task

SPLITS = ("train", "val", "test", "ood_test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "ind_test": "test",
    "test_ind": "test",
    "ind": "test",
    "in_domain": "test",
    "ood": "ood_test",
    "ood_test": "ood_test",
    "test_ood": "ood_test",
    "out_of_domain": "ood_test",
}
FIELDS = ("task", "split", "instruction", "input", "options", "output", "images")
_OPTION_PREFIX = re.compile(r"^\s*([A-Z])\s*[:.)]\s*")


def normalise_split(value: Any) -> str | None:
    """Map the split spellings seen in the wild onto `train`, `val`, `test`, `ood_test`."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    key = re.sub(r"[\s\-]+", "_", str(value).strip().lower())
    if not key:
        return None
    if key in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[key]
    raise UsageError(f"unknown split {value!r}; expected one of train, val/validation, test, ood/test_ood")


def split_or_none(value: Any) -> str | None:
    """`normalise_split`, with None for an unknown spelling (rows are counted, never raised on)."""
    try:
        return normalise_split(value)
    except ValueError:
        return None


@dataclass
class Record:
    """One validated MMECInstruct record with its JSON fields parsed."""

    id: str
    task: str  # full task name, e.g. "category_classification"
    instruction: str
    input: dict | list
    options: list[str]
    images: list[str]
    output: str | None = None
    split: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> Task:
        return get_task(self.task)

    @property
    def labels(self) -> tuple[str, ...]:
        return option_labels(self.spec, self.options)

    def to_row(self, *, json_fields: bool = True) -> dict:
        """The record in dataset form (`input`, `options`, `images` as JSON strings by default)."""
        row = {
            "id": self.id,
            "task": self.task,
            "split": self.split,
            "instruction": self.instruction,
            "input": self.input,
            "options": self.options,
            "output": self.output,
            "images": self.images,
        }
        if json_fields:
            for k in ("input", "options", "images"):
                row[k] = json.dumps(row[k], ensure_ascii=False)
        return row

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reject:
    """A row that failed validation, kept so that every input row is accounted for."""

    id: str
    source: str | None
    row: int | None
    field: str | None
    reason: str
    task: str | None = None
    split: str | None = None

    @classmethod
    def from_error(cls, err: RecordError, raw: Any) -> Reject:
        task = raw.get("task") if isinstance(raw, dict) else None
        split = raw.get("split") if isinstance(raw, dict) else None
        return cls(
            id=err.record_id or raw_id(raw),
            source=err.source,
            row=err.row,
            field=err.field,
            reason=err.reason,
            task=str(task) if task is not None else None,
            split=str(split) if split is not None else None,
        )


def option_labels(task: Task, options: list[str]) -> tuple[str, ...]:
    """Valid answers for a record: yes/no, or the option letters (`A: ...` prefixes, else A, B, ...)."""
    if task.label_kind == "yes_no":
        return task.labels()
    positional = task.labels(options)
    found = []
    for i, opt in enumerate(options):
        m = _OPTION_PREFIX.match(opt) if isinstance(opt, str) else None
        found.append(m.group(1) if m else positional[i])
    return tuple(found)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_id(
    task: str, split: str | None, instruction: str, input_value: Any, options: list, output: str | None, images: list
) -> str:
    """A stable id from the parsed content: the same record in JSONL or Parquet gets the same id."""
    payload = _canonical([task, split, instruction, input_value, options, output, images])
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def raw_id(raw: Any) -> str:
    """Id for a row that could not be parsed: its `id` if it has one, else a hash of the raw row."""
    if isinstance(raw, dict) and raw.get("id") not in (None, ""):
        return str(raw["id"])
    return "raw-" + hashlib.sha1(_canonical(raw).encode("utf-8")).hexdigest()[:16]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _not_json(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_field(value: Any, name: str, expect: type | tuple[type, ...], err) -> Any:
    """Accept a JSON-encoded string or an already-structured value; check its type."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from Parquet/pandas
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_not_json)
        except json.JSONDecodeError as e:
            raise err(f"malformed JSON ({e.msg} at char {e.pos}): {value[:80]!r}", name) from None
        except RecursionError:
            raise err("malformed JSON (nested too deeply)", name) from None
        except ValueError as e:  # NaN/Infinity, or an integer too long to convert
            raise err(f"malformed JSON ({str(e)[:120]})", name) from None
    if not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise err(f"expected a JSON {names}, got {type(value).__name__}", name)
    return value


def parse_record(raw: Any, *, source: str | None = None, row: int | None = None) -> Record:
    """Validate one raw row (a dict from JSONL, JSON or Parquet) into a `Record`.

    Raises `RecordError` naming the source, row, id and field on the first problem.
    """
    given_id = str(raw["id"]) if isinstance(raw, dict) and not _is_missing(raw.get("id")) else None

    def err(reason: str, fld: str | None = None) -> RecordError:
        return RecordError(reason, source=source, row=row, record_id=given_id or raw_id(raw), field=fld)

    if not isinstance(raw, dict):
        raise err(f"expected an object with fields {', '.join(FIELDS)}, got {type(raw).__name__}")

    task_value = raw.get("task")
    if _is_missing(task_value):
        raise err("missing required field", "task")
    try:
        task = get_task(str(task_value))
    except KeyError as e:
        raise err(str(e.args[0]), "task") from None

    try:
        split = normalise_split(raw.get("split"))
    except ValueError as e:
        raise err(str(e), "split") from None

    instruction = raw.get("instruction")
    if _is_missing(instruction) or not isinstance(instruction, str) or not instruction.strip():
        raise err("expected a non-empty string", "instruction")

    if _is_missing(raw.get("input")):
        raise err("missing required field", "input")
    if task.layout == "sequence":
        input_value = _json_field(raw["input"], "input", list, err)
        if not input_value or not all(isinstance(x, str) for x in input_value):
            raise err("expected a non-empty JSON list of history strings for SR", "input")
    else:
        input_value = _json_field(raw["input"], "input", dict, err)
        missing = [k for k in task.input_keys if k not in input_value]
        if missing:
            raise err(f"missing key(s) {missing} for task {task.abbr}; required: {list(task.input_keys)}", "input")

    options_value = raw.get("options")
    options = (
        [] if _is_missing(options_value) or options_value == "" else _json_field(options_value, "options", list, err)
    )
    if not all(isinstance(o, str) for o in options):
        raise err("expected a JSON list of strings", "options")
    if len(options) > len(OPTION_LETTERS):
        raise err(
            f"{len(options)} options; at most {len(OPTION_LETTERS)} (answered with the letters A to Z)", "options"
        )
    if task.label_kind == "option_letter" and not options:
        raise err(f"task {task.abbr} answers with an option letter, but the record has no options", "options")

    images_value = raw.get("images")
    if _is_missing(images_value):
        raise err("missing required field", "images")
    images = _json_field(images_value, "images", list, err)
    if not all(isinstance(u, str) and u.strip() for u in images):
        raise err("expected a JSON list of non-empty URL strings", "images")
    expected = task.expected_images(input_value, options)
    if len(images) != expected:
        layout = {
            "single": "1 image (the product)",
            "pair": "2 images (product 1, product 2)",
            "sequence": f"{expected} images (one per history item, then one per option)",
        }[task.layout]
        raise err(f"expected {layout} for task {task.abbr}, got {len(images)}", "images")

    output = raw.get("output")
    if _is_missing(output) or output == "":
        output = None
    else:
        output = str(output).strip()
        labels = option_labels(task, options)
        if output not in labels:
            raise err(
                f"answer {output!r} is not a valid label for {task.abbr}; expected one of {list(labels)}", "output"
            )

    extra = {k: v for k, v in raw.items() if k not in FIELDS and k != "id"}
    rid = given_id or content_id(task.name, split, instruction, input_value, options, output, images)
    return Record(
        id=rid,
        task=task.name,
        instruction=instruction,
        input=input_value,
        options=list(options),
        images=list(images),
        output=output,
        split=split,
        extra=extra,
    )


def caption_list(info: Any) -> list[str | None] | None:
    """A record's `caption_info` (JSON text or a list; captions aligned with `images`, as the released data
    carries them) as a list of captions; None when absent. Raises ValueError when it is not a JSON list."""
    if info is None:
        return None
    captions = json_or_text(info)
    if not isinstance(captions, list):
        raise ValueError("caption_info is not a JSON list")
    return [None if c is None else str(c) for c in captions]


def json_or_text(value: Any) -> Any:
    """A JSON string parsed, any other value (or non-JSON text) as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
