"""What a model batch did, counted from its output batch: images through each stage, by outcome.

A pool's actors count their own stages on every batch they return (the first pool counts too what reached it:
records that failed validation and images fetched and decoded, or not), so a job's progress can be watched as
the work happens rather than as parts are written. Keys are `"stage/outcome"`:

    validate/failed     records that failed validation (first pool)
    fetch_decode/ok     images fetched and decoded; fetch_decode/failed: the fetch or the decode failed (first pool)
    caption/ok          images captioned by this batch; caption/cached: captioned earlier in the run; caption/failed;
                        caption/stored: the result store's caption (an earlier run's)
    <judge>/ok          captions the judge voted on; <judge>/failed: the judge failed on them; <judge>/stored: the
                        store's vote

Counted with Arrow compute on the item columns (`caslie_core.items`), never row by row.
"""

from __future__ import annotations


def _n(mask) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(pc.fill_null(mask, False), "int64")).as_py() or 0)


def count(table, *, arrivals: bool = False, fetched: bool = True, caption: bool = False, judges=()) -> dict[str, int]:
    """The outcomes of one output batch of a pool: `arrivals` (the first pool: validation and fetch/decode, the
    latter when `fetched`, i.e. images were fetched rather than captions taken from the records), `caption` (the
    pool captions), `judges` (the names of the judges the pool runs)."""
    import pyarrow.compute as pc

    out: dict[str, int] = {}
    if table.num_rows == 0:
        return out
    if arrivals:
        out["validate/failed"] = _n(pc.equal(table.column("error").combine_chunks().field("stage"), "validate"))
    slots = pc.list_flatten(table.column("images")).combine_chunks()
    if len(slots) == 0:
        return {k: v for k, v in out.items() if v}
    stage = slots.field("error").field("stage")
    if arrivals and fetched:
        failed = _n(pc.is_in(stage, value_set=_strings("fetch", "decode")))
        out["fetch_decode/failed"], out["fetch_decode/ok"] = failed, len(slots) - failed
    if caption:
        made = pc.is_valid(slots.field("caption"))
        cached = pc.fill_null(slots.field("cached"), False)
        stored = pc.is_valid(slots.field("stored_from"))
        out["caption/ok"] = _n(pc.and_(pc.and_(made, pc.invert(cached)), pc.invert(stored)))
        out["caption/cached"] = _n(pc.and_(made, cached))
        out["caption/stored"] = _n(stored)
        out["caption/failed"] = _n(pc.equal(stage, "caption"))
    if judges:
        votes = pc.list_flatten(slots.field("votes"))
        judge, error = votes.field("judge"), votes.field("error")
        for name in judges:
            mine = pc.equal(judge, name)
            failed = _n(pc.and_(mine, pc.is_valid(error)))
            out[f"{name}/failed"] = failed
            stored = pc.and_(mine, pc.is_valid(votes.field("stored_from")))
            out[f"{name}/ok"] = _n(pc.and_(pc.and_(mine, pc.is_valid(votes.field("vote"))), pc.invert(stored)))
            out[f"{name}/stored"] = _n(stored)
    return {k: v for k, v in out.items() if v}


def _strings(*values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def add(into: dict[str, int], more: dict[str, int] | None) -> dict[str, int]:
    for k, v in (more or {}).items():
        into[k] = into.get(k, 0) + v
    return into
