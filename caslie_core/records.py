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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import RecordError, SourceError
from .tasks import Task, get_task

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
    raise ValueError(f"unknown split {value!r}; expected one of train, val/validation, test, ood/test_ood")


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


def _json_field(value: Any, name: str, expect: type | tuple[type, ...], err) -> Any:
    """Accept a JSON-encoded string or an already-structured value; check its type."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from Parquet/pandas
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise err(f"malformed JSON ({e.msg} at char {e.pos}): {value[:80]!r}", name) from None
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


# ---------------------------------------------------------------------------------------------
# Reading files


Format = Literal["jsonl", "json", "parquet"]


def detect_format(path: str) -> Format:
    name = path.lower().split("?", 1)[0]
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise SourceError(
        f"{path}: unsupported file type; expected .jsonl/.ndjson, .json (a list or JSON lines) or .parquet"
        " (optionally compressed: .gz, .bz2, .xz, .zst for JSON)"
    )


def _open_text(path: str):
    import fsspec  # local import keeps `import caslie_core` light

    try:
        return fsspec.open(path, "rt", encoding="utf-8", compression="infer").open()
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except Exception as e:  # network, credentials, unknown protocol
        raise SourceError(f"{path}: cannot open ({type(e).__name__}: {e})") from None


def _iter_jsonl(path: str, fh) -> Iterator[tuple[int, Any]]:
    seen_any = False
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        seen_any = True
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            err = RecordError(
                f"malformed JSON line ({e.msg} at char {e.pos})", source=path, row=lineno, record_id=f"{path}#L{lineno}"
            )
            err.raw_text = line.rstrip("\n")  # kept so that the bad line itself can travel to the output
            yield lineno, err
    if not seen_any:
        raise SourceError(f"{path}: file is empty (no records)")


def _iter_json_array(path: str, fh, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Stream the objects of a top-level JSON list without loading the whole file."""
    decoder = json.JSONDecoder()
    buf = fh.read(chunk_size)
    pos = 0
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        more = fh.read(chunk_size)
        if not more:
            eof = True
            return False
        buf = buf[pos:] + more
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return

    skip_ws()
    if pos >= len(buf):
        raise SourceError(f"{path}: file is empty (no records)")
    if buf[pos] != "[":
        raise SourceError(f"{path}: expected a JSON list of records or JSON lines")
    pos += 1
    index = 0
    skip_ws()
    if pos < len(buf) and buf[pos] == "]":
        raise SourceError(f"{path}: the JSON list is empty (no records)")
    while True:
        skip_ws()
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if not fill():
                    raise SourceError(
                        f"{path}: truncated or malformed JSON after {index} record(s) ({e.msg})"
                    ) from None
        pos = end
        index += 1
        yield index, obj
        skip_ws()
        if pos >= len(buf):
            raise SourceError(f"{path}: truncated JSON list after {index} record(s): missing ']'")
        ch = buf[pos]
        pos += 1
        if ch == "]":
            return
        if ch != ",":
            raise SourceError(f"{path}: malformed JSON list after record {index}: expected ',' or ']'")


def _iter_parquet(path: str, batch_size: int = 4096) -> Iterator[tuple[int, Any]]:
    import fsspec
    import pyarrow.parquet as pq

    try:
        fh = fsspec.open(path, "rb").open()
        pf = pq.ParquetFile(fh)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except Exception as e:
        raise SourceError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if pf.metadata.num_rows == 0:
        raise SourceError(f"{path}: file is empty (no records)")
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                index += 1
                yield index, row
    except Exception as e:
        raise SourceError(f"{path}: corrupt Parquet data after {index} row(s) ({type(e).__name__}: {e})") from None
    finally:
        fh.close()


def iter_raw_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yield `(row_number, raw_row)` from one file; a malformed JSON line comes as a `RecordError`."""
    fmt = detect_format(path)
    if fmt == "parquet":
        yield from _iter_parquet(path)
        return
    fh = _open_text(path)
    try:
        try:
            head = fh.read(1)
            while head and head in " \t\r\n\ufeff":
                head = fh.read(1)
        except (EOFError, OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if not head:
            raise SourceError(f"{path}: file is empty (no records)")
        fh.seek(0)
        if fmt == "json" and head not in "[{":
            raise SourceError(f"{path}: expected a JSON list of records or JSON lines")
        if fmt == "json" and head == "[":
            yield from _iter_json_array(path, fh)
        else:
            yield from _iter_jsonl(path, fh)
    except (EOFError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: truncated or undecodable file ({type(e).__name__}: {e})") from None
    finally:
        fh.close()


def iter_records(path: str, *, mode: Literal["strict", "collect"] = "strict") -> Iterator[Record | Reject]:
    """Stream validated records from a file.

    strict: raise `RecordError` at the first bad row. collect: yield a `Reject` for each bad row
    (including a repeated id) in its place, so the caller can account for every row.
    File-level problems (missing, empty, truncated, unknown type) raise `SourceError` in both modes.
    """
    if mode not in ("strict", "collect"):
        raise ValueError(f"mode must be 'strict' or 'collect', got {mode!r}")
    seen: set[str] = set()
    for row, raw in iter_raw_rows(path):
        try:
            if isinstance(raw, RecordError):
                raise raw
            rec = parse_record(raw, source=path, row=row)
            if rec.id in seen:
                raise RecordError(
                    "duplicate record id (an identical record, or a repeated `id`, came earlier)",
                    source=path,
                    row=row,
                    record_id=rec.id,
                    field="id",
                )
            seen.add(rec.id)
            yield rec
        except RecordError as e:
            if mode == "strict":
                raise
            yield Reject.from_error(e, raw if not isinstance(raw, RecordError) else {})


@dataclass
class LoadResult:
    records: list[Record]
    rejects: list[Reject]

    @property
    def total(self) -> int:
        return len(self.records) + len(self.rejects)


def load_records(paths: str | list[str], *, mode: Literal["strict", "collect"] = "strict") -> LoadResult:
    """Load one or more files into memory (small data: tests, serving, evaluation tables)."""
    records, rejects = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        for item in iter_records(path, mode=mode):
            (records if isinstance(item, Record) else rejects).append(item)
    return LoadResult(records, rejects)
