"""The enrichment output store: schema, atomic Parquet parts (with their counts), listing, reading back.

Resume and de-duplication over a whole output live in `io.ledger`.

Layout: `OUTPUT/records/[task=<name>/]part-<sha1 of its ids>.parquet`, one row per input record.
A part is written under a temporary dot-name and renamed, so a reader never sees half a part, and its
name depends only on the ids it holds and where they came in the input, so a rerun of the same batch overwrites
instead of duplicating.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from ..errors import SourceError
from ..tasks import get_task

OUTPUT_COLUMNS = (
    "id",
    "task",
    "split",
    "status",
    "error",
    "instruction",
    "input",
    "options",
    "output",
    "images",
    "original_input",
    "original_options",
    "n_images",
    "n_failed_images",
    "n_kept",
    "image_results",
    "extra",
    "raw",
    "captioner_model",
    "captioner_revision",
    "judges",
    "prompt_version",
    "config_hash",
    "run_id",
    "input_order",  # where the record came in the input (file, row): of an id repeated there, the first is kept
    "captioner_engine",  # JSON: hf, or the OpenAI-compatible server's hosts and model ids (`pipeline.engine_of`)
)
# What training reads of an output row (the text, before and after enrichment), and evaluation besides.
TEXT_COLUMNS = OUTPUT_COLUMNS[:4] + ("instruction", "input", "options", "output", "original_input", "original_options")
EVAL_COLUMNS = TEXT_COLUMNS + ("images", "image_results")


def output_schema():
    """Strings where the MMECInstruct schema has them (`input`, `options`, `images` as JSON text); the job's
    own columns native: `error` a struct {stage, message, source}, `image_results` a list of structs."""
    import pyarrow as pa

    from ..items import record_error_type, result_type

    types = {
        "n_images": pa.int32(),
        "n_failed_images": pa.int32(),
        "n_kept": pa.int32(),
        "input_order": pa.int64(),
        "error": record_error_type(),
        "image_results": pa.list_(result_type()),
    }
    return pa.schema([(c, types.get(c, pa.string())) for c in OUTPUT_COLUMNS])


def partition_value(task: str) -> str:
    try:
        return get_task(task).name
    except KeyError:
        return "_invalid"


def parts_root(output: str) -> str:
    return output.rstrip("/") + "/records"


TALLY_KEY = b"caslie.tally"  # a part's counts (JSON), in its Parquet key-value metadata


def _row_key(row: dict) -> str:
    """What names a part: its rows' ids and places in the input (a retried batch has the same; a batch of the same
    ids from elsewhere in the input, an id the input repeats, does not, and so never overwrites the first)."""
    at = row.get("input_order")
    return row["id"] if at is None else f"{row['id']}@{at}"


def write_parts(rows: list[dict], output: str, *, partition: bool, tally=None) -> list[dict]:
    """Write finalized output rows as Parquet parts, atomically (temporary name, then rename).

    A part's name is a hash of its rows' ids and input places, so a retried batch overwrites its own part. `tally(rows)`,
    when given, is stored in the part's metadata (`TALLY_KEY`) and returned, one per part written."""
    import json

    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(parts_root(output))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(partition_value(r["task"] or "") if partition else "", []).append(r)
    counts = []
    schema = output_schema()
    for value, group in groups.items():
        folder = f"{root}/task={value}" if partition else root
        fs.makedirs(folder, exist_ok=True)
        name = "part-" + hashlib.sha1("\n".join(sorted(map(_row_key, group))).encode()).hexdigest()[:20]
        final = f"{folder}/{name}.parquet"
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}.parquet"
        table = pa.Table.from_pylist(group, schema=schema)
        if tally is not None:
            counts.append(tally(group))
            table = table.replace_schema_metadata({TALLY_KEY: json.dumps(counts[-1]).encode()})
        with fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, write_page_checksum=True)  # a damaged part is found on resume (ledger.scan)
        fs.mv(tmp, final)
    return counts


def list_parts(output: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(parts_root(output))
    if not fs.exists(root):
        return []
    files = [p for p in fs.find(root) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    return [fs.unstrip_protocol(p) if "://" in output else p for p in files]


def read_output(output: str, columns: list[str] | None = None) -> list[dict]:
    """All written output rows (for tests and small outputs; jobs never read the whole output back)."""
    import fsspec
    import pyarrow.parquet as pq

    rows = []
    for path in list_parts(output):
        with fsspec.open(path, "rb") as fh:
            rows.extend(pq.read_table(fh, columns=columns).to_pylist())
    return rows


def is_enriched_parquet(path: str) -> bool:
    """A Parquet file written by the enrichment job (it has `status` and `original_input` columns)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
    return {"status", "original_input"} <= names


@dataclass
class Inputs:
    """What a training or evaluation input resolved to: enrichment parts, raw record files (and, once loaded,
    their valid rows and how many were rejected), problems."""

    enriched: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    record_rows: list[dict] = field(default_factory=list)
    rejected: int = 0


def load_inputs(paths: str | list[str], *, key: str = "input.path") -> Inputs:
    """`classify_inputs`, then the raw record files read and validated (rejects counted, never raised)."""
    from .sources import load_records

    inputs = classify_inputs(paths, key=key)
    if inputs.records and not inputs.problems:
        loaded = load_records(inputs.records, mode="collect")
        # a released record's captions travel with it (`caslie_core.render` reads them)
        inputs.record_rows = [{**r.to_row(), "caption_info": r.extra.get("caption_info")} for r in loaded.records]
        inputs.rejected = len(loaded.rejects)
    return inputs


def classify_inputs(paths: str | list[str], *, key: str = "input.path") -> Inputs:
    """Enrichment output (a job's output folder, its parts) vs raw MMECInstruct records, for `key`."""
    import fsspec

    from .folders import MixedFormatsError
    from .sources import find_record_files, is_records_file

    out = Inputs()
    for path in [paths] if isinstance(paths, str) else list(paths):
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            out.problems.append(f"{key}: {path} does not exist")
            continue
        if fs.isdir(root):
            parts = list_parts(path) if fs.exists(root.rstrip("/") + "/records") else []
            if parts:
                out.enriched.extend(parts)
                continue
            try:
                found = find_record_files(path, key=key)
            except MixedFormatsError as e:
                out.problems.append(str(e))
                continue
            except SourceError:
                out.problems.append(f"{key}: {path} holds no enrichment output (records/) and no JSONL/JSON/Parquet")
                continue
        elif is_records_file(path):
            found = [path]
        else:
            out.problems.append(f"{key}: {path}: not JSONL, JSON or Parquet")
            continue
        for f in found:
            (out.enriched if f.endswith(".parquet") and is_enriched_parquet(f) else out.records).append(f)
    return out
