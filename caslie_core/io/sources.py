"""Reading MMECInstruct-schema records from files: format detection, streaming readers, folder discovery.

One copy of "which files in this folder are records" for every job (enrich, train, evaluate), and the
reading plan of the enrichment job (parallel readers or the driver). `io.store.classify_inputs` tells
enrichment output apart from raw records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import RecordError, SourceError
from ..records import Record, Reject, parse_record

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


def is_records_file(path: str) -> bool:
    """A file whose name says it holds records (JSONL, JSON, Parquet)."""
    try:
        detect_format(path)
        return True
    except SourceError:
        return False


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def find_record_files(path: str, *, key: str = "input.path") -> list[str]:
    """The record files at `path`: the file itself, or every records file below a folder (sorted).

    `key` names the config field in the error (a folder with no records file in it)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        # hidden and `_` files in a folder (.tmp-*, _SUCCESS, _metadata) are never records
        found = sorted(p for p in fs.find(root) if not _hidden(p) and is_records_file(p))
        if not found:
            raise SourceError(f"{key}: {path}: folder has no .jsonl, .json or .parquet files")
        return [fs.unstrip_protocol(p) if "://" in path else p for p in found]
    return [path]


@dataclass
class Read:
    """How one input file is read: `text` (JSON lines) or `parquet` by parallel readers, else `driver`."""

    path: str
    format: Format
    reader: Literal["text", "parquet", "driver"]
    filesystem: Any = None  # a pyarrow filesystem for remote paths (parallel readers only)
    rows: int | None = None  # about how many records (JSON lines: size / the first MiB's bytes per line)


def estimate_lines(fs, path: str, sample: int = 1 << 20) -> int | None:
    """About how many lines a text file holds: its size over the bytes per line of its first `sample` bytes."""
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as fh:
            head = fh.read(sample)
    except Exception:  # noqa: BLE001 - an estimate only: the reader reports a file it cannot open
        return None
    lines = head.count(b"\n") + (0 if head.endswith(b"\n") else 1)
    return max(1, round(size * lines / len(head))) if head else 0


PARALLEL_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs")


def reading_plan(paths: str | list[str], fmt: str = "auto", *, count_lines: bool = False) -> list[Read]:
    """Every records file under `paths` with the way to read it: uncompressed JSONL and Parquet on local or
    object storage go to parallel readers; JSON lists, compressed files and http(s)/hf URLs through one process.
    `count_lines`: estimate each JSON-lines file's records (`Read.rows`; one small read per file, on the driver)."""
    import fsspec

    plan = []
    for root in [paths] if isinstance(paths, str) else list(paths):
        for path in find_record_files(root):
            f = detect_format(path) if fmt == "auto" else fmt
            scheme = path.split("://", 1)[0] if "://" in path else "file"
            if scheme not in PARALLEL_SCHEMES or f not in ("jsonl", "parquet") or path.endswith(".gz"):
                plan.append(Read(path, f, "driver"))
                continue
            fs, stripped = fsspec.core.url_to_fs(path)
            if not fs.exists(stripped):
                raise SourceError(f"input.path {path}: no such file")
            rows = estimate_lines(fs, stripped) if count_lines and f == "jsonl" else None
            filesystem = None
            if scheme != "file":
                from pyarrow.fs import FSSpecHandler, PyFileSystem

                filesystem, path = PyFileSystem(FSSpecHandler(fs)), stripped
            plan.append(Read(path, f, "text" if f == "jsonl" else "parquet", filesystem, rows))
    return plan


def raw_texts(path: str) -> Iterator[str]:
    """Each raw row of a file as JSON text (a malformed line keeps its own text, to be reported as such)."""
    for _, raw in iter_raw_rows(path):
        yield raw.raw_text if isinstance(raw, Exception) else json.dumps(raw, default=str)
