"""Reading MMECInstruct-schema records from files: streaming readers (JSON Lines as the format defines it, JSON
lists, Parquet) and validation into records or rejects.

Which files of a folder are records, and the enrichment job's reading plan, are in `io.folders` (re-exported
here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import RecordError, SourceError
from ..records import Record, Reject, parse_record
from .folders import (  # noqa: F401 - the reading plan is imported from here by the jobs
    NOT_RECORDS,
    PARALLEL_SCHEMES,
    Format,
    Found,
    Plan,
    Read,
    detect_format,
    estimate_lines,
    find_record_files,
    is_records_file,
    reading_plan,
    survey,
)


def _open_text(path: str):
    import fsspec  # local import keeps `import caslie_core` light

    try:
        # JSON Lines ends a line at "\n" only (a U+2028 or U+0085 inside a string is data); a BOM is not data
        return fsspec.open(path, "rt", encoding="utf-8-sig", newline="\n", compression="infer").open()
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
            err.raw_text = line.rstrip("\r\n")  # kept so that the bad line itself can travel to the output
            yield lineno, err
    if not seen_any:
        raise SourceError(f"{path}: file is empty (no records)")


def split_json_lines(data: bytes, path: str) -> list[str]:
    """The records of a JSON Lines file's bytes, as the format defines them: lines end at "\n" only (U+2028,
    U+0085 or a form feed inside a string are data, where `str.splitlines` would cut the record in two), a "\r"
    before it is dropped (CRLF files), a UTF-8 byte order mark at the start is ignored, blank lines skipped.
    Bytes that are not UTF-8 fail the file, naming the line (as `caslie validate` does)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SourceError(f"{path}: line {line} is not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return [line for line in lines if line and not line.isspace()]


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
    """Load one or more files (a folder: its records files, by the rule of `survey`) into memory (small data:
    tests, serving, evaluation tables, `caslie validate`)."""
    records, rejects = [], []
    files = [f for p in ([paths] if isinstance(paths, str) else paths) for f in find_record_files(p)]
    for path in files:
        for item in iter_records(path, mode=mode):
            (records if isinstance(item, Record) else rejects).append(item)
    return LoadResult(records, rejects)


def raw_texts(path: str) -> Iterator[str]:
    """Each raw row of a file as JSON text (a malformed line keeps its own text, to be reported as such)."""
    for _, raw in iter_raw_rows(path):
        yield raw.raw_text if isinstance(raw, Exception) else json.dumps(raw, default=str)
