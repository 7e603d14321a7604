"""The output ledger: finished ids for resume, counts from the parts' metadata, duplicates (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import FakeCaptioner, FakeJudge

from caslie_core.enrichment import pipeline
from caslie_core.images import FetchPolicy
from caslie_core.io import ledger, store
from caslie_core.synthetic import write_catalog


def test_done_ids_are_exact_for_every_id_including_digests_ending_in_nul():
    ids = [f"r{i}" for i in range(50_000)]
    done = ledger.DoneIds(ledger.id_digests(ids))
    assert len(done) == len(ids) and all(done(i) for i in ids)
    assert not any(done(f"x{i}") for i in range(50_000))
    # numpy's S16 drops trailing NUL bytes: a digest must never end in one
    assert all(ledger.id_digest(i)[-1:] != b"\x00" for i in ids[:1000])
    mixed = [f"x{i}" if i % 3 else f"r{i}" for i in range(60_000)]  # beyond both ends of the sorted array too
    assert done.many(mixed) == [done(i) for i in mixed] == [i % 3 == 0 and i < 50_000 for i in range(60_000)]
    assert ledger.DoneIds(ledger.id_digests([])).many(["a", "b"]) == [False, False] and done.many([]) == []


def test_add_counts_sums_nested_counts():
    a = {"records": 2, "ok": 1, "records_per_task": {"CC": 2}}
    b = {"records": 3, "failed": 3, "records_per_task": {"CC": 1, "AP": 2}}
    assert ledger.add_counts(a, b) == {"records": 5, "ok": 1, "failed": 3, "records_per_task": {"CC": 3, "AP": 2}}
    assert ledger.add_counts(ledger.add_counts(a, b), b, -1) == {
        **a,
        "failed": 0,
        "records_per_task": {"CC": 2, "AP": 0},
    }


@pytest.fixture
def written(tmp_path):
    """A small catalog enriched with the fakes and written as parts of 5 rows (with their counts)."""
    m = write_catalog(tmp_path / "cat", 23, seed=3, broken_images=2)
    rows = [{"text": line} for line in open(m["jsonl"])] + [{"text": "{broken"}]
    out = str(tmp_path / "out")
    total: dict = {}

    def write(batch):
        nonlocal total
        for counts in store.write_parts(batch, out, partition=True, tally=pipeline.tally):
            total = ledger.add_counts(total, counts)

    everything = pipeline.run_local(
        rows,
        policy=FetchPolicy(allow_local_files=True, retries=0),
        captioner=FakeCaptioner(),
        judges={"a": FakeJudge()},
        size=16,
        max_pixels=10**7,
        provenance={},
        batch=5,
        on_batch=write,
    )
    return out, everything, total


def test_scan_returns_every_finished_id_and_the_counts_the_parts_carry(written):
    out, rows, total = written
    digests, counts, n = ledger.scan(out)
    done = ledger.DoneIds(digests)
    assert n == len(rows) == 24 and all(done(r["id"]) for r in rows)
    assert counts == total == pipeline.tally(rows)
    assert counts["failed"] == 1 and counts["partial"] == 2 and counts["records"] == 24


def test_a_part_without_stored_counts_is_recounted_from_its_columns(written):
    out, rows, total = written
    path = sorted(store.list_parts(out))[0]
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)  # as an older version wrote it
    # without a recount that part contributes its ids but no counts
    assert ledger.scan(out)[1]["records"] == total["records"] - table.num_rows and ledger.scan(out)[2] == 24
    _, counts, _ = ledger.scan(out, recount=pipeline.tally_table, columns=pipeline.TALLY_COLUMNS)
    assert counts == total


def test_drop_duplicates_removes_later_copies_and_their_counts(written, tmp_path):
    out, rows, total = written
    first = sorted(store.list_parts(out))[0]
    copy = first.rsplit("/", 1)[0] + "/part-zzzz-copy.parquet"  # a late write of the same records
    pq.write_table(pq.read_table(first), copy)
    dup = pq.read_table(first).num_rows
    removed, counts = ledger.drop_duplicates(out, recount=pipeline.tally_table)
    assert removed == dup and counts["records"] == dup
    ids = [r["id"] for r in store.read_output(out, ["id"])]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert ledger.scan(out)[1] == total  # the counts left in the parts are the output's counts again
    assert ledger.drop_duplicates(out) == (0, {})


def test_summary_counts_shape(written):
    _, rows, total = written
    s = pipeline.summary_counts(total)
    assert s["records"] == 24 and set(s["kept_share"]) <= set(s["images_per_task"])
    assert json.dumps(s)  # plain JSON


def test_progress_line_every_interval_with_eta_when_the_total_is_known():
    now = [0.0]
    lines: list[str] = []
    p = pipeline.Progress(10, total=1000, say=lines.append, clock=lambda: now[0])
    p.add({"records": 100, "ok": 90, "failed": 10, "images": 200, "kept": 50})
    assert lines == []  # not yet 10 s
    now[0] = 10.0
    p.add({"records": 100, "ok": 100, "images": 200, "kept": 50})
    assert len(lines) == 1
    line = lines[0]
    assert "200 / 1,000 records (20%)" in line and "190 ok" in line and "10 failed" in line
    assert "40.0 images/s" in line and "100 captions kept" in line and "ETA 0m40s" in line
    silent = pipeline.Progress(0, total=None, say=lines.append)
    silent.add({"records": 5})
    assert len(lines) == 1 and "5 records:" in silent.line()


def test_parse_skips_finished_records_whether_or_not_they_name_their_id(tmp_path):
    from caslie_core.enrichment import stages

    m = write_catalog(tmp_path / "cat", 6, seed=5)
    lines = [json.loads(line) for line in open(m["jsonl"])]
    named = [json.dumps(r) for r in lines[:3]]
    unnamed = [json.dumps({k: v for k, v in r.items() if k != "id"}) for r in lines[3:]]
    rows = [{"text": t} for t in [*named, *unnamed, "{broken"]]
    first = stages.parse_items(rows)
    assert len(first) == 7
    done = ledger.DoneIds(ledger.id_digests([first[0].id, first[4].id, first[6].id]))
    asked: list[str] = []

    def counting(rid: str) -> bool:
        asked.append(rid)
        return done(rid)

    again = stages.parse_items(rows, done=counting)
    assert [i.id for i in again] == [first[k].id for k in (1, 2, 3, 5)]
    assert len(asked) == len(set(asked)) == 7  # each row's id looked up once


def test_of_an_id_the_input_repeats_the_first_copy_in_input_order_is_kept_whatever_the_part_names(written):
    out, rows, _ = written
    folder = sorted(store.list_parts(out))[0].rsplit("/", 1)[0]
    table = pq.read_table(sorted(store.list_parts(out))[0])
    row = table.slice(0, 1).to_pylist()[0]
    first = {**row, "instruction": "FIRST copy", "input_order": 1}
    later = {**row, "instruction": "later copy", "input_order": 10**6}
    schema = store.output_schema()
    pq.write_table(pa.Table.from_pylist([first], schema=schema), folder + "/part-zzzz-first.parquet")
    pq.write_table(pa.Table.from_pylist([later], schema=schema), folder + "/part-0000-later.parquet")
    repeated: list = []
    removed, _ = ledger.drop_duplicates(out, recount=pipeline.tally_table, repeated=repeated)
    kept = [r for r in store.read_output(out, ["id", "instruction", "input_order"]) if r["id"] == row["id"]]
    assert removed == 2 and [r["instruction"] for r in kept] == ["FIRST copy"]
    assert repeated == [row["id"]]  # three copies, from two places in the input: one repeated id


def test_one_record_written_twice_is_not_a_repeated_id(written):
    out, _, _ = written
    first = sorted(store.list_parts(out))[0]
    pq.write_table(pq.read_table(first), first.rsplit("/", 1)[0] + "/part-zzzz-copy.parquet")
    repeated: list = []
    removed, _ = ledger.drop_duplicates(out, repeated=repeated)
    assert removed > 0 and repeated == []
