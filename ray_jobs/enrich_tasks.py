"""The enrichment plane's CPU tasks: prepare (validate, skip finished, fetch, decode, look up the result store)
and write (finalize, write Parquet parts, return counts). The driver never reads the output: a write task returns
one small row of counts."""

from __future__ import annotations

import json
import time

import pyarrow as pa

from caslie_core.enrichment import pipeline, stages
from caslie_core.errors import OutputError
from caslie_core.images import FetchPolicy
from caslie_core.io import ledger

from . import counters

_DONE: dict[str, ledger.DoneIds] = {}  # the finished ids of a resumed run, mapped once per worker process


def _done(done_ref) -> ledger.DoneIds | None:
    import ray

    if done_ref is None:
        return None
    if done_ref.hex() not in _DONE:
        _DONE.clear()
        _DONE[done_ref.hex()] = ledger.DoneIds(ray.get(done_ref))  # zero-copy: numpy from the object store
    return _DONE[done_ref.hex()]


def prepare_batch(batch: pa.Table, policy: FetchPolicy, threads: int, max_pixels: int, size: int, **kw):
    done, t = _done(kw.pop("done_ref", None)), time.perf_counter()
    out = stages.prepare(
        batch.to_pylist(), policy=policy, threads=threads, max_pixels=max_pixels, size=size, done=done, **kw
    )
    counters.batch_seconds("fetch_decode", time.perf_counter() - t)
    return out


COUNTS = pa.schema([("counts", pa.string())])


def write_batch(batch: pa.Table, output: str, provenance: dict, partition: bool) -> pa.Table:
    """Finalize and write a batch; return its counts (one small row: the driver never reads the output)."""
    try:
        counts = pipeline.write(batch, output=output, provenance=provenance, partition=partition)
    except OSError as e:  # the output, not a record: no later batch can be written either
        raise OutputError(f"{type(e).__name__}: {e}") from None
    return pa.Table.from_pylist([{"counts": json.dumps(counts)}], schema=COUNTS)
