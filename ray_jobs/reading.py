"""How the enrichment job reads its input into Ray Data: one dataset of raw rows, whatever the files' formats.

Which files, and how each is read, is decided in `caslie_core.io.sources.reading_plan`; here are the readers.
JSON Lines goes through `JsonLinesDatasource` (not `ray.data.read_text`, whose `str.splitlines` cuts a record at
a U+2028 or U+0085 inside a string and keeps a byte order mark). Imports Ray Data: imported by the job when it
builds its dataset.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ray.data.datasource import FileBasedDatasource

from caslie_core.config import EnrichConfig
from caslie_core.enrichment import pipeline
from caslie_core.io.folders import ORDER, input_order
from caslie_core.io.sources import Plan, raw_texts, reading_plan, split_json_lines

from .common import log

if TYPE_CHECKING:
    import pyarrow


class _Numbered(FileBasedDatasource):
    """A file's rows, each with its place in the input (`ORDER`: this file's place in the plan, the row's in it)."""

    def __init__(self, paths, *, file_index: int, **kwargs) -> None:
        super().__init__(paths, **kwargs)
        self.file_index = file_index

    def _order(self, start: int, n: int):
        import pyarrow as pa

        first = input_order(self.file_index, start)
        return pa.array(range(first, first + n), pa.int64())


class JsonLinesDatasource(_Numbered):
    """A JSON Lines file's records as `{"text": <one record's JSON>}` rows, split as the format says
    (`split_json_lines`)."""

    def _read_stream(self, f: pyarrow.NativeFile, path: str):
        import pyarrow as pa

        lines = split_json_lines(f.readall(), path)
        yield pa.table({"text": pa.array(lines, pa.string()), ORDER: self._order(0, len(lines))})


class ParquetRowsDatasource(_Numbered):
    """A Parquet file's records, a row group's batches at a time, numbered (`ray.data.read_parquet` cannot say
    which row of its file a row was). Parquet needs random access: the file is opened as one, not as a stream."""

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)

    def _read_stream(self, f: pyarrow.NativeFile, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        start = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            yield table.append_column(ORDER, self._order(start, table.num_rows))
            start += table.num_rows


def _as_text(batch: pyarrow.Table) -> pyarrow.Table:
    """Parquet rows as JSON Lines rows (`{"text": ...}`), for an input that mixes both."""
    import pyarrow as pa

    rows = batch.drop_columns([ORDER]).to_pylist()
    texts = [json.dumps(row, default=str) for row in rows]
    return pa.table({"text": pa.array(texts, pa.string()), ORDER: batch.column(ORDER)})


def read_raw(cfg: EnrichConfig, plan: Plan | None = None):
    """Dataset of raw rows: `{"text": <one record as JSON>}` (JSONL, JSON) or the record's columns (Parquet); when
    `input.path` lists both kinds, every row as text (one shape: a union never pads one kind with the other's
    columns). The job's log says which files it reads."""
    import ray.data

    widest = max((pool.max_size for _, pool in cfg.model_pools_used()), default=1)
    if plan is None:
        plan = reading_plan(cfg.input.path, cfg.input.format, count_lines=widest > 1)  # blocks only for wide pools
    log.info(f"[enrich] reading {plan.found.line()}")
    parts = []
    for i, r in enumerate(plan):
        if r.reader == "text":
            blocks = pipeline.read_blocks(r.rows, cfg.records_per_batch, widest)  # every actor of a pool gets work
            source = JsonLinesDatasource(r.path, file_index=i, filesystem=r.filesystem)
            ds = ray.data.read_datasource(source, num_cpus=cfg.task_num_cpus, override_num_blocks=blocks)
        elif r.reader == "parquet":
            source = ParquetRowsDatasource(r.path, file_index=i, filesystem=r.filesystem)
            ds = ray.data.read_datasource(source, num_cpus=cfg.task_num_cpus)
            if plan.mixed:
                ds = ds.map_batches(_as_text, batch_format="pyarrow", num_cpus=cfg.task_num_cpus)
        else:  # JSON lists, compressed files and http(s)/hf URLs stream through the driver
            texts = enumerate(raw_texts(r.path))
            ds = ray.data.from_items([{"text": text, ORDER: input_order(i, n)} for n, text in texts])
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.limit(cfg.input.limit) if cfg.input.limit else ds
