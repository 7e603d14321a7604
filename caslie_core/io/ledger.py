"""What an output folder already holds: its finished ids (to resume), its counts, its duplicates.

Built for catalogs of millions of records: nothing here is meant to run on the job's driver. `scan`
reads every part whole (in threads: parts may be on S3), its pages checked against their CRCs, so that a part
damaged after it was written is found, moved aside to `OUTPUT/quarantine/` and its records redone, never
skipped as finished; it keeps the `id` column and the counts in the footer, and returns the finished ids as a sorted array of 16-byte digests (16 bytes per record, shared zero-copy by every task
through Ray's object store) plus the counts stored in each part's metadata. `drop_duplicates` keeps one
row per id with the id columns in Arrow (about the ids' length + 4 bytes per record, in one task).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import SourceError
from .store import TALLY_KEY, list_parts, parts_root

THREADS = 16


def add_counts(a: dict, b: dict, sign: int = 1) -> dict:
    """`a + sign * b` for nested dicts of counts (missing keys count as 0)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = add_counts(out.get(k) or {}, v, sign)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = out.get(k, 0) + sign * v
    return out


def id_digest(rid: str) -> bytes:
    """16 bytes per id: 15 of blake2b and a last byte that is never NUL (numpy's `S16` strips trailing NULs,
    which would make a digest ending in one compare unequal to itself: 1 id in 256 never resumed)."""
    return hashlib.blake2b(rid.encode("utf-8"), digest_size=15).digest() + b"\x01"


def id_digests(ids: Iterable[str]):
    """Sorted unique digests of `ids` (a numpy `S16` array)."""
    import numpy as np

    return np.unique(np.fromiter((id_digest(i) for i in ids), dtype="S16"))


class DoneIds:
    """Membership in a sorted digest array: `done(id) -> bool`."""

    def __init__(self, digests) -> None:
        import numpy as np

        self.digests, self._np = digests, np  # called once per record: no import on that path

    def __len__(self) -> int:
        return len(self.digests)

    def __call__(self, rid: str) -> bool:
        return bool(self.many([rid])[0])

    def many(self, ids: list[str]) -> list[bool]:
        """Membership of each id, in one vectorised lookup (a batch of rows at once)."""
        np, n = self._np, len(self.digests)
        if n == 0 or not ids:
            return [False] * len(ids)
        wanted = np.fromiter((id_digest(i) for i in ids), dtype="S16", count=len(ids))
        at = np.minimum(np.searchsorted(self.digests, wanted), n - 1)
        return (self.digests[at] == wanted).tolist()


def _open_part(path: str, columns: list[str], *, verify: bool = False):
    """(the part's ids or columns as a table, its stored counts or None); `verify`: every column is read and
    its pages checked against their checksums (parts written before checksums: decoded), so that damage anywhere
    raises here."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh, page_checksum_verification=verify)
        meta = pf.schema_arrow.metadata or {}
        counts = json.loads(meta[TALLY_KEY]) if TALLY_KEY in meta else None
        if verify:
            return pf.read().select(columns), counts
        return pf.read(columns=columns), counts


QUARANTINE = "quarantine"


def quarantine(output: str, path: str) -> str:
    """Move an output part aside to `OUTPUT/quarantine/` (same relative path), out of the records a run reads,
    resumes from or trains on; return where it went."""
    import fsspec

    fs, part = fsspec.core.url_to_fs(path)
    _, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    rel = part[len(root) + 1 :] if part.startswith(root + "/") else part.rsplit("/", 1)[-1]
    dest = f"{root}/{QUARANTINE}/{rel}"
    fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(part, dest)
    return fs.unstrip_protocol(dest) if "://" in output else dest


def sweep_temporaries(output: str) -> int:
    """Remove the `.tmp-*` parts killed writers left behind (a part is written under one, then renamed)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(parts_root(output))
    if not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if p.rsplit("/", 1)[-1].startswith(".tmp-")]
    for p in stale:
        try:
            fs.rm(p)
        except FileNotFoundError:  # renamed or removed meanwhile by a writer still finishing
            pass
    return len(stale)


def scan(
    output: str, *, recount: Callable | None = None, columns: tuple[str, ...] = (), damaged: list | None = None
) -> tuple:
    """(sorted digests of every finished id, the summed counts of every part, the number of rows).

    A part without stored counts (written by an older version) is counted with `recount(table)` over
    `columns` read besides the ids, when given. A part that cannot be read whole (truncated, overwritten, a page
    whose checksum fails) is moved to `quarantine/` and left out: its records are not finished; `damaged`, when
    given, gets `(part, where it went, why)` for each."""
    import numpy as np

    paths = list_parts(output)
    if not paths:
        return np.array([], dtype="S16"), {}, 0
    cols = ["id", *columns] if recount else ["id"]

    def one(path):
        try:
            table, counts = _open_part(path, cols, verify=True)
            if counts is None and recount is not None:
                counts = recount(table)
            return table.column("id").to_pylist(), counts or {}
        except Exception as e:  # noqa: BLE001 - whatever the damage, the part's records are redone
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
            try:
                return None, (path, quarantine(output, path), why)
            except Exception as moved:  # noqa: BLE001 - say what to do by hand
                raise SourceError(
                    f"output part {path} is damaged ({why}) and could not be moved aside "
                    f"({type(moved).__name__}: {moved}): move or delete it, then rerun the same command"
                ) from None

    total: dict = {}
    ids: list[str] = []
    with ThreadPoolExecutor(THREADS) as pool:
        for part_ids, counts in pool.map(one, paths):
            if part_ids is None:
                (damaged if damaged is not None else []).append(counts)
                continue
            ids.extend(part_ids)
            total = add_counts(total, counts)
    return id_digests(ids), total, len(ids)  # len(ids) - len(digests): ids written more than once


def _ids_and_order(path: str):
    """A part's `id` column and its `input_order` (all null in parts written before it existed)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        cols = ["id", "input_order"] if "input_order" in pf.schema_arrow.names else ["id"]
        table = pf.read(columns=cols)
    order = table.column("input_order") if len(cols) == 2 else pa.nulls(table.num_rows, pa.int64())
    return table.column("id"), order


def _keepers(columns: list, dup_set) -> tuple[dict, list[str]]:
    """{id: (part index, row) of the copy kept} for each repeated id: the first in input order (a row without
    one, from an older part, after those with one; then part name and row), and the ids the input itself repeated
    (copies from different places in the input, not one record written twice)."""
    import pyarrow.compute as pc

    best: dict[str, tuple] = {}
    places: dict[str, set] = {}
    for pi, (ids, order) in enumerate(columns):
        hit = pc.is_in(ids, value_set=dup_set)
        if not pc.any(hit).as_py():
            continue
        for ri in pc.indices_nonzero(hit).to_pylist():
            rid, at = ids[ri].as_py(), order[ri].as_py()
            key = (at is None, at or 0, pi, ri)
            if rid not in best or key < best[rid]:
                best[rid] = key
            places.setdefault(rid, set()).add(at)
    repeated = sorted(rid for rid, at in places.items() if len(at - {None}) > 1)
    return {rid: key[2:] for rid, key in best.items()}, repeated


def drop_duplicates(output: str, *, recount: Callable | None = None, repeated: list | None = None) -> tuple[int, dict]:
    """Keep one row per id across parts; return (rows removed, their counts to subtract).

    A killed driver's write tasks can still finish after it died (Ray stops a dead job's workers within
    seconds, not at once), so a rerun started meanwhile may write some records twice; a catalog may also
    repeat an id. Of an id's copies the first in input order is kept (`input_order`; see `_keepers`), the others
    removed (their part rewritten atomically with its counts recomputed by `recount`, deleted when empty);
    `repeated`, when given, gets the ids the input repeated."""
    import fsspec
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = sorted(list_parts(output))
    if not paths:
        return 0, {}
    with ThreadPoolExecutor(THREADS) as pool:
        columns = list(pool.map(_ids_and_order, paths))
    all_ids = pa.chunked_array([c for ids, _ in columns for c in ids.chunks], type=pa.string())
    counts = pc.value_counts(all_ids)
    dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return 0, {}
    dup_set = pa.array(dup)
    keepers, again = _keepers(columns, dup_set)
    if repeated is not None:
        repeated.extend(again)
    removed, removed_counts = 0, {}
    for pi, (path, (col, _)) in enumerate(zip(paths, columns)):
        if not pc.any(pc.is_in(col, value_set=dup_set)).as_py():
            continue
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            table, meta = pf.read(), dict(pf.schema_arrow.metadata or {})
        keep = [rid not in keepers or keepers[rid] == (pi, ri) for ri, rid in enumerate(table.column("id").to_pylist())]
        kept = table.filter(pa.array(keep))
        gone = table.filter(pc.invert(pa.array(keep)))
        removed += gone.num_rows
        if recount is not None:
            removed_counts = add_counts(removed_counts, recount(gone))
            if kept.num_rows:
                meta[TALLY_KEY] = json.dumps(recount(kept)).encode()
        if kept.num_rows == 0:
            fs.rm(p)
            continue
        folder, name = p.rsplit("/", 1)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        with fs.open(tmp, "wb") as fh:
            pq.write_table(kept.replace_schema_metadata(meta), fh, write_page_checksum=True)
        fs.mv(tmp, p)
    return removed, removed_counts
