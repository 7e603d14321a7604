"""The enrichment stages' contracts, on deterministic fake models (no torch, no Ray; each test well under 1 s).

What a row becomes is computed here from the fakes' rules, so the tests check the stages' bookkeeping:
every record out once with a status, per-image failures as data with their stage, identical (image,
request) pairs captioned once, the keep rule, and the output columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import CAPTION_ERROR, JUDGE_ERROR, FakeCaptioner, FakeJudge, fake_caption, sha1

from caslie_core.enrichment import pipeline, stages
from caslie_core.enrichment.cache import LocalCaptionCache
from caslie_core.images import FetchPolicy, decode_image
from caslie_core.io.store import OUTPUT_COLUMNS
from caslie_core.models.judge import keep_caption
from caslie_core.prompts import caption_request, judge_question
from caslie_core.records import parse_record
from caslie_core.synthetic import write_catalog

SIZE = 32
MAX_PIXELS = 10**7
POLICY = FetchPolicy(allow_local_files=True, retries=0)
PROVENANCE = {
    "captioner_model": "fake:captioner",
    "captioner_revision": "r1",
    "judges": json.dumps([{"name": "a"}]),
    "prompt_version": "pv",
    "config_hash": "hash",
    "run_id": "run-1",
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """16 records of all 7 tasks (multi-image PRP and SR among them), 3 of them with a broken image."""
    out = tmp_path_factory.mktemp("contract-catalog")
    m = write_catalog(out, 16, seed=4, broken_images=3)
    m["lines"] = Path(m["jsonl"]).read_text().splitlines()
    m["records"] = {json.loads(line)["id"]: parse_record(json.loads(line)) for line in m["lines"]}
    return m


@pytest.fixture(scope="module")
def decoded(catalog):
    """The catalog parsed, fetched and decoded once (stage tests run on shallow copies)."""
    rows = [{"text": line} for line in catalog["lines"]]
    return stages.prepare(rows, policy=POLICY, threads=4, max_pixels=MAX_PIXELS, size=SIZE)


def run(rows, captioner, judges=None, *, cache=None, batch=4, on_batch=None):
    return pipeline.run_local(
        rows,
        policy=POLICY,
        captioner=captioner,
        judges=judges if judges is not None else {"a": FakeJudge()},
        size=SIZE,
        max_pixels=MAX_PIXELS,
        provenance=PROVENANCE,
        cache=cache,
        batch=batch,
        on_batch=on_batch,
    )


def raw_rows(catalog, *extra):
    return [{"text": line} for line in catalog["lines"]] + [{"text": t} for t in extra]


def results(row) -> list[dict]:
    return row["image_results"]


def votes(result: dict) -> dict:
    return {v["judge"]: v["vote"] for v in result["votes"]}


def pixels_of(path: str) -> bytes | None:
    """The decoded pixels the captioner is given for an image file (None when it cannot be decoded)."""
    try:
        return decode_image(Path(path).read_bytes(), max_pixels=MAX_PIXELS, size=SIZE).tobytes()
    except Exception:
        return None


def test_every_input_row_comes_out_once_with_a_status(catalog):
    first = json.loads(catalog["lines"][1])
    rows = raw_rows(
        catalog,
        "{not json",
        json.dumps({**first, "id": "badtask", "task": "nope"}),
        json.dumps({**first, "id": "dup-of-1"}),
    )
    batches = []
    out = run(rows, FakeCaptioner(), batch=4, on_batch=batches.append)
    assert len(out) == len(rows) and sum(map(len, batches)) == len(rows) and len(batches) == 5
    ids = [o["id"] for o in out]
    assert len(set(ids)) == len(ids)
    assert set(ids) >= set(catalog["records"]) | {"badtask", "dup-of-1"}
    assert all(o["status"] in stages.STATUSES for o in out)
    failed = {o["id"]: o for o in out if o["status"] == "failed"}
    assert len(failed) == 2 and "badtask" in failed
    for o in failed.values():
        assert o["error"]["stage"] == "validate" and o["raw"] and o["image_results"] == []
    for o in out:
        if o["status"] != "failed":
            res = results(o)
            assert len(res) == o["n_images"] == len(json.loads(o["images"]))
            assert o["n_failed_images"] == sum(r["error"] is not None for r in res)
            assert o["status"] == ("partial" if o["n_failed_images"] else "ok")
    summary = pipeline.summarize(out)
    assert (summary["records"], summary["failed"]) == (len(rows), 2)
    assert summary["ok"] + summary["partial"] == len(rows) - 2


def test_output_rows_have_exactly_the_output_columns_and_the_provenance(catalog):
    out = run(raw_rows(catalog, "{not json"), FakeCaptioner())
    assert {o["status"] for o in out} == {"ok", "partial", "failed"}
    for o in out:
        assert set(o) == set(OUTPUT_COLUMNS) and len(o) == len(OUTPUT_COLUMNS)
        assert {k: o[k] for k in PROVENANCE} == PROVENANCE


def test_broken_images_make_the_row_partial_with_the_failing_stage(catalog):
    captioner = FakeCaptioner()
    by_id = {o["id"]: o for o in run(raw_rows(catalog), captioner)}
    broken = {b["id"]: b for b in catalog["broken_images"]}
    assert {b["kind"] for b in broken.values()} == {"missing", "truncated", "not_an_image"}
    for rid, b in broken.items():
        o = by_id[rid]
        assert o["status"] == "partial" and o["n_failed_images"] == 1
        bad = [r for r in results(o) if r["url"] == b["image"]]
        assert len(bad) == 1 and bad[0]["caption"] is None and not bad[0]["kept"]
        # the record's error names the failing image's stage (and how many of its images failed)
        assert o["error"]["stage"] == bad[0]["error"]["stage"] and bad[0]["error"]["message"] in o["error"]["message"]
        assert o["n_images"] == 1 or o["error"]["message"].startswith(f"1 of {o['n_images']} image(s) failed")
        assert bad[0]["error"]["stage"] == ("fetch" if b["kind"] == "missing" else "decode")
        assert bad[0]["error"]["stage"] in stages.ERROR_STAGES and bad[0]["error"]["message"]
    # the broken images never reached the captioner; every other image did
    good = [r for o in by_id.values() if o["status"] != "failed" for r in results(o) if r["error"] is None]
    assert all(r["caption"] for r in good)
    assert all(o["status"] == "ok" for rid, o in by_id.items() if rid not in broken)
    slots = [(o["id"], r["index"]) for o in by_id.values() for r in results(o) if r["error"] is None]
    assert set(captioner.prompts) == {caption_request(catalog["records"][rid], i) for rid, i in slots}
    assert len(captioner.prompts) == len(slots)


def test_a_caption_failure_marks_that_image_and_is_not_cached(catalog):
    """Image 0 of a two-image PRP record fails in the captioner: that image alone carries the error."""
    rid, rec = next((rid, r) for rid, r in catalog["records"].items() if len(r.images) == 2)
    doomed = caption_request(rec, 0)
    cache = LocalCaptionCache()
    first = FakeCaptioner(fail_on=lambda image, prompt: prompt == doomed)
    out = {o["id"]: o for o in run(raw_rows(catalog), first, cache=cache)}
    o = out[rid]
    assert o["status"] == "partial" and o["n_failed_images"] == 1
    res = results(o)
    assert res[0]["error"] == {"stage": "caption", "message": CAPTION_ERROR}
    assert res[0]["caption"] is None and not res[0]["kept"]
    assert res[1]["error"] is None and res[1]["caption"]
    assert json.loads(o["input"])["product 1 information extracted from image"] is None
    broken = {b["id"] for b in catalog["broken_images"]}
    assert all(x["status"] == "ok" for k, x in out.items() if k not in broken | {rid})
    # failures are not cached: the next pass over the same cache asks for the failed pair alone
    second = FakeCaptioner()
    again = {o["id"]: o for o in run(raw_rows(catalog), second, cache=cache)}
    assert second.items == 1 and second.prompts == [doomed]
    assert again[rid]["status"] == "ok" and results(again[rid])[0]["caption"]
    assert not results(again[rid])[0]["cached"] and results(again[rid])[1]["cached"]


def test_item_positions_and_crashes_of_the_fake_captioner(decoded):
    """The fake itself: positions count over calls; a crashing batch is retried item by item, each item then
    fails alone; only a captioner that fails everything, batch after batch, stops the stage (EngineError)."""
    caps = FakeCaptioner(fail_on={1})
    got = caps.caption([b"a", b"b"], ["p", "p"]) + caps.caption([b"a"], ["p"])
    assert [r.error is not None for r in got] == [False, True, False] and (caps.calls, caps.items) == (2, 3)
    assert got[0].caption == got[2].caption == fake_caption(b"a", "p")
    cache = LocalCaptionCache()
    crashing = FakeCaptioner(raise_always=True)
    stage = stages.CaptionStage(crashing, SIZE, cache)
    out = stages.finalize(stage(decoded), provenance={})
    pairs = {(s["digest"], s["prompt"]) for row in decoded.column("images").to_pylist() for s in row if not s["error"]}
    assert crashing.calls == 1 + len(pairs)  # the batch, then each distinct (image, request) pair alone
    for o in out:
        for r in results(o):
            assert r["error"] is None or r["error"]["stage"] in ("fetch", "decode", "caption")
            if r["error"] and r["error"]["stage"] == "caption":
                assert "the whole batch crashed" in r["error"]["message"] and r["caption"] is None
    assert cache.done == {}
    stage(decoded)
    with pytest.raises(stages.EngineError, match="the captioner failed on every item of 3 batches in a row"):
        stage(decoded)


def test_a_captioner_that_raises_on_one_item_fails_that_image_only(catalog, decoded):
    rid, rec = next((rid, r) for rid, r in catalog["records"].items() if len(r.images) == 2)
    doomed = caption_request(rec, 1)
    captioner = FakeCaptioner(raise_on=lambda image, prompt: prompt == doomed)
    out = {o["id"]: o for o in stages.finalize(stages.CaptionStage(captioner, SIZE)(decoded), provenance={})}
    res = results(out[rid])
    assert res[1]["error"] == {"stage": "caption", "message": "RuntimeError: fake captioner: raised on one item"}
    assert res[0]["error"] is None and res[0]["caption"]
    assert out[rid]["status"] == "partial" and out[rid]["error"]["stage"] == "caption"
    broken = {b["id"] for b in catalog["broken_images"]}
    assert all(o["status"] == "ok" for k, o in out.items() if k not in broken | {rid})


def test_a_stage_that_raises_on_one_row_fails_that_row_and_the_batch_goes_on(decoded):
    """A row the stage cannot handle (here: pixels of the wrong size) fails with the stage's name."""
    import pyarrow as pa

    from caslie_core.items import PIXELS

    px = decoded.column(PIXELS).to_pylist()
    victim = next(r for r, row in enumerate(px) if row and row[0])
    px[victim] = [b"\x00" * 7] * len(px[victim])
    table = decoded.set_column(decoded.column_names.index(PIXELS), PIXELS, pa.array(px, pa.list_(pa.binary())))
    out = stages.finalize(stages.CaptionStage(FakeCaptioner(), SIZE)(table), provenance={})
    assert out[victim]["status"] == "failed" and out[victim]["error"]["stage"] == "caption"
    assert "reshape" in out[victim]["error"]["message"]
    assert [o["id"] for o in out] == decoded.column("id").to_pylist()
    assert sum(o["status"] == "failed" for o in out) == 1


def test_a_stage_wired_before_its_input_names_the_missing_columns(decoded):
    from caslie_core.items import ContractError

    with pytest.raises(ContractError, match=r"reads columns \['pixels'\].*present: \['id'"):
        stages.CaptionStage(FakeCaptioner(), SIZE)(decoded.drop_columns(["pixels"]))


def test_identical_pairs_are_captioned_once(catalog):
    """Copies of records under new ids, in later batches: each (image, request) pair reaches the captioner once."""
    lines = [json.loads(line) for line in catalog["lines"]]
    copies = [json.dumps({**lines[k], "id": f"copy{k}"}) for k in (0, 2, 6, 1)]  # AP, PRP, SR, broken CC
    rows = raw_rows(catalog, *copies)
    captioner = FakeCaptioner()
    out = {o["id"]: o for o in run(rows, captioner, cache=LocalCaptionCache(), batch=5)}
    pairs = set()
    for line in catalog["lines"]:
        rec = parse_record(json.loads(line))
        for i, url in enumerate(rec.images):
            px = pixels_of(url)
            if px is not None:
                pairs.add((px, caption_request(rec, i)))
    assert captioner.items == len(pairs) and captioner.calls <= 4
    for k in (0, 2, 6, 1):
        orig, copy = out[lines[k]["id"]], out[f"copy{k}"]
        assert copy["status"] == orig["status"]
        for a, b in zip(results(orig), results(copy)):
            assert b["caption"] == a["caption"] and b["error"] == a["error"]
            assert b["cached"] == (a["error"] is None) and not a["cached"]
    # each caption is the one for its own image and request (no slot mix-up)
    recs = {**catalog["records"], **{f"copy{k}": parse_record(json.loads(c)) for k, c in zip((0, 2, 6, 1), copies)}}
    for rid, o in out.items():
        rec = recs[rid]
        for r in results(o):
            if r["error"] is None:
                assert r["caption"] == fake_caption(pixels_of(rec.images[r["index"]]), caption_request(rec, r["index"]))


def _parity(salt: str):
    return lambda q: int(sha1(salt + q)[:4], 16) % 2 == 0


def test_kept_follows_the_vote_rule_of_the_judges(catalog, decoded):
    judges = {
        "a": FakeJudge(_parity("a")),
        "b": FakeJudge(_parity("b")),
        "c": FakeJudge(_parity("c"), fail_on=_parity("fail")),
    }
    table = stages.CaptionStage(FakeCaptioner(), SIZE)(decoded)
    for name, judge in judges.items():
        table = stages.JudgeStage(judge, name)(table)
    out = stages.finalize(table, provenance=PROVENANCE)
    kept_seen, failed_seen = set(), 0
    for o in out:
        rec = catalog["records"][o["id"]]
        for r in results(o):
            assert [v["judge"] for v in r["votes"]] == list(judges)  # the panel's order
            failed = False
            for name, judge in judges.items():
                if r["caption"] is None:
                    assert votes(r)[name] is None
                    continue
                q = judge_question(rec, r["index"], r["caption"])
                failed_here = judge.fail_on is not None and judge.fail_on(q)
                assert votes(r)[name] == (None if failed_here else judge.rule(q))
                vote = next(v for v in r["votes"] if v["judge"] == name)
                assert vote["error"] == (JUDGE_ERROR if failed_here else None)
                failed |= failed_here
            if failed:  # a judge's failure is the image's error (stage judge), never an abstention
                assert r["error"] == {"stage": "judge", "message": f"c: {JUDGE_ERROR}"} and not r["kept"]
                failed_seen += 1
            assert r["kept"] == keep_caption(r["caption"], r["error"], list(votes(r).values()))
            kept_seen.add(r["kept"])
        assert o["n_kept"] == sum(r["kept"] for r in results(o))
    assert kept_seen == {True, False} and failed_seen  # the rule was exercised both ways, with failed votes
    assert sum(j.items for j in judges.values()) == 3 * sum(
        r["caption"] is not None for o in out for r in results(o)
    )  # broken images are never judged


YES, NO = (lambda q: True), (lambda q: False)


@pytest.mark.parametrize(
    ("rules", "kept"),
    [
        ({"a": YES}, True),
        ({"a": YES, "b": NO}, False),  # a tie keeps nothing
        ({"a": YES, "b": NO, "c": YES}, True),
        ({"a": NO, "b": NO, "c": YES}, False),
        ({"a": YES, "b": "fail"}, False),  # a failed vote is an error on the image, not an abstention
        ({"a": "fail"}, False),  # no valid vote, no caption
        ({}, False),  # no judge, no caption
    ],
    ids=["yes", "tie", "2-1", "1-2", "yes+failed", "failed", "no-judges"],
)
def test_plurality_of_valid_votes_keeps_a_caption(decoded, rules, kept):
    judges = {n: FakeJudge(fail_on=YES) if r == "fail" else FakeJudge(r) for n, r in rules.items()}
    table = stages.CaptionStage(FakeCaptioner(), SIZE)(decoded)
    for name, judge in judges.items():
        table = stages.JudgeStage(judge, name)(table)
    out = stages.finalize(table, provenance={})
    for o in out:
        for r in results(o):
            assert set(votes(r)) == set(judges)
            assert r["kept"] == (kept and r["caption"] is not None)
        assert o["n_kept"] == (sum(r["caption"] is not None for r in results(o)) if kept else 0)
