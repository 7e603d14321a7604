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
from caslie_core.io.sources import Plan, raw_texts, reading_plan, split_json_lines

from .common import log

if TYPE_CHECKING:
    import pyarrow


class JsonLinesDatasource(FileBasedDatasource):
    """A JSON Lines file's records as `{"text": <one record's JSON>}` rows, split as the format says
    (`split_json_lines`)."""

    _COLUMN_NAME = "text"

    def _read_stream(self, f: pyarrow.NativeFile, path: str):
        import pyarrow as pa

        yield pa.table({"text": pa.array(split_json_lines(f.readall(), path), pa.string())})


def _as_text(batch: pyarrow.Table) -> pyarrow.Table:
    """Parquet rows as JSON Lines rows (`{"text": ...}`), for an input that mixes both."""
    import pyarrow as pa

    texts = [json.dumps(row, default=str) for row in batch.to_pylist()]
    return pa.table({"text": pa.array(texts, pa.string())})


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
    for r in plan:
        if r.reader == "text":
            blocks = pipeline.read_blocks(r.rows, cfg.records_per_batch, widest)  # every actor of a pool gets work
            ds = ray.data.read_datasource(
                JsonLinesDatasource(r.path, filesystem=r.filesystem),
                num_cpus=cfg.task_num_cpus,
                override_num_blocks=blocks,
            )
        elif r.reader == "parquet":
            ds = ray.data.read_parquet(r.path, filesystem=r.filesystem, num_cpus=cfg.task_num_cpus)
            if plan.mixed:
                ds = ds.map_batches(_as_text, batch_format="pyarrow", num_cpus=cfg.task_num_cpus)
        else:  # JSON lists, compressed files and http(s)/hf URLs stream through the driver
            ds = ray.data.from_items([{"text": text} for text in raw_texts(r.path)])
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.limit(cfg.input.limit) if cfg.input.limit else ds
