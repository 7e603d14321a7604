"""The enrichment job on a real local Ray cluster with the real tiny models."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT
from imageserver import ImageServer
from PIL import Image

from caslie_core.config import EnrichConfig, load_config
from caslie_core.io import ledger, store
from caslie_core.synthetic import write_catalog
from ray_jobs import enrich

pytestmark = pytest.mark.slow
DEMO = str(ROOT / "configs" / "enrich-demo.yaml")


def config(inp, out, *extra):
    return load_config(EnrichConfig, DEMO, [f"input.path={inp}", f"output.path={out}", *extra])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A catalog served over HTTP, with every kind of broken image and a few unusual modes."""
    root = tmp_path_factory.mktemp("served")
    server = ImageServer(root / "images", slow_s=2.0)
    m = write_catalog(root, 21, seed=11, tasks=["CC", "AP", "PRP"], base_url=server.url)
    rows = [json.loads(line) for line in open(m["jsonl"])]
    img = root / "images"
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(img / "cmyk.jpg", "JPEG")
    Image.new("I;16", (30, 20), 3000).save(img / "deep.png", "PNG")
    (img / "noimage.png").write_bytes(b"this is text, not a picture")
    full = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full, "PNG")
    (img / "trunc.png").write_bytes(full.getvalue()[:50])
    (img / "huge.png").write_bytes(b"\x89PNG" + os.urandom(300_000))
    cases = {  # record index -> (first image URL, expected status, failing stage or None)
        0: (f"{server.url}/flaky/cmyk.jpg", "ok", None),
        1: (f"{server.url}/deep.png", "ok", None),
        3: (f"{server.url}/missing/x.png", "partial", "fetch"),
        4: (f"{server.url}/slow/cmyk.jpg", "partial", "fetch"),
        6: (f"{server.url}/noimage.png", "partial", "decode"),
        7: (f"{server.url}/trunc.png", "partial", "decode"),
        9: (f"{server.url}/huge.png", "partial", "fetch"),
    }
    for i, (url, _, _) in cases.items():
        urls = json.loads(rows[i]["images"])
        urls[0] = url
        rows[i]["images"] = json.dumps(urls)
    rows.append({**rows[2], "id": "bad-images", "images": json.dumps(["only-one"])})  # PRP needs 2
    expected = {rows[i]["id"]: (status, stage) for i, (_, status, stage) in cases.items()}
    expected["bad-images"] = ("failed", "validate")
    yield rows, expected, server
    server.close()


# Small batches and parts, so that a kill lands while the job is writing (the demo config batches 128 rows).
SMALL_BATCHES = [
    "records_per_batch=4",
    "captioner.pool.batch_size=4",
    "judges.0.pool.batch_size=4",
    "judges.1.pool.batch_size=4",
    "output.rows_per_part=4",
]
HTTP_SETTINGS = [
    "fetch.allow_local_files=false",
    "fetch.allowlist=[127.0.0.1/32]",
    "fetch.read_timeout=0.5",
    "fetch.retries=1",
    "fetch.backoff=0.01",
    "fetch.max_bytes=100000",
    "output.report_per_task=0",  # report.html fetches its thumbnails again: the hit counts asserted are the job's
]


def test_http_images_s3_records_and_output(ray_session, catalog, s3_bucket, tmp_path):
    import boto3
    import fsspec

    rows, expected, server = catalog
    # one image comes from S3 too
    s3_img = tmp_path / "s3img.png"
    Image.new("RGB", (20, 20), (5, 6, 7)).save(s3_img, "PNG")
    boto3.client("s3").upload_file(str(s3_img), s3_bucket, "img/s3img.png")
    rows = [dict(r) for r in rows]
    urls = json.loads(rows[10]["images"])
    urls[0] = f"s3://{s3_bucket}/img/s3img.png"
    rows[10]["images"] = json.dumps(urls)
    local = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist(rows), local)
    boto3.client("s3").upload_file(str(local), s3_bucket, "in/records.parquet")
    out = f"s3://{s3_bucket}/enriched"
    summary = enrich.run(config(f"s3://{s3_bucket}/in/records.parquet", out, *HTTP_SETTINGS))

    written = store.read_output(out)
    ids = [r["id"] for r in written]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # exactly one output row per input record
    # the timeline: every record went through each pool (one actor each here), and no node came or went
    timeline = summary["timeline"]
    assert set(timeline["pools"]) == {"captioner.pool", "judges.0.pool", "judges.1.pool"} and not timeline["nodes"]
    for pool in timeline["pools"].values():
        assert sum(a["rows"] for a in pool["actors"]) == len(rows) and pool["peak_actors"] == 1
    assert 0 < timeline["first_batch_s"] <= timeline["last_record_s"] <= summary["wall_seconds"]
    # the same helper actor held the run's caption claims: every caption made went into it
    assert summary["caption_cache"]["entries"] > 0 and "unavailable" not in summary["caption_cache"]
    by_id = {r["id"]: r for r in written}
    for rid, (status, stage) in expected.items():
        row = by_id[rid]
        assert row["status"] == status, (rid, row["error"])
        if status == "partial":
            first = row["image_results"][0]
            assert first["error"]["stage"] == stage and first["caption"] is None and not first["kept"]
        if status == "failed":
            assert row["error"]["stage"] == "validate" and "expected 2 images" in row["error"]["message"]
    others = [r for r in written if r["id"] not in expected]
    assert others and all(r["status"] == "ok" for r in others)
    for r in written:
        if r["status"] == "failed":
            continue
        res = r["image_results"]
        assert len(res) == r["n_images"]
        for item in res:
            votes = {v["judge"]: v["vote"] for v in item["votes"]}
            assert list(votes) == ["judge_logits", "judge_generate"]
            assert votes["judge_logits"] in ("yes", "no") or item["caption"] is None
        assert r["prompt_version"] and r["config_hash"] == summary["config_hash"]
        assert json.loads(r["judges"])[1]["mode"] == "generate"
    assert server.hits["/flaky/cmyk.jpg"] == 2
    s3_row = by_id[rows[10]["id"]]
    assert s3_row["status"] == "ok" and s3_row["image_results"][0]["url"].startswith("s3://")
    assert summary["records"] == len(rows) and summary["duplicates_removed"] == 0
    assert summary["ok"] + summary["partial"] + summary["failed"] == len(rows) and summary["failed"] == 1
    assert summary["errors_per_stage"]["fetch"] == 3 and summary["errors_per_stage"]["decode"] == 2
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{s3_bucket}/enriched/summary.json") and fs.exists(f"{s3_bucket}/enriched/resolved_config.yaml")
    assert any("task=category_classification" in p for p in store.list_parts(out))


def _caption_actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "CaptionActor" in cmd:
                pids.append(int(proc.name))
    return pids


def test_captioner_actor_killed_mid_run_loses_nothing(ray_session, tmp_path):
    m = write_catalog(tmp_path / "cat", 48, seed=4)
    out = tmp_path / "out"
    cfg = config(m["jsonl"], out, *SMALL_BATCHES)
    result = {}
    worker = threading.Thread(target=lambda: result.update(enrich.run(cfg)))
    worker.start()
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and worker.is_alive() and not killed:
        if store.list_parts(str(out)):
            for pid in _caption_actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    worker.join(timeout=240)
    assert killed, "the captioner actor was never seen running"
    assert result, "the job did not finish after its captioner was killed"
    ids = [r["id"] for r in store.read_output(str(out), ["id"])]
    assert len(ids) == 48 and len(set(ids)) == 48
    assert result["failed"] == 0


def test_driver_killed_then_rerun_resumes_without_duplicates(ray_session, tmp_path):
    # Large enough that the tasks a dead driver leaves in flight cannot finish the whole catalog (60 did, once, on CI).
    N = 200
    m = write_catalog(tmp_path / "cat", N, seed=8, broken_images=2)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "ray_jobs.enrich",
        "--config",
        DEMO,
        "--set",
        f"input.path={m['jsonl']}",
        "--set",
        f"output.path={out}",
        "--set",
        "records_per_batch=4",
        "--set",
        "captioner.pool.batch_size=4",
        "--set",
        "judges.0.pool.batch_size=4",
        "--set",
        "judges.1.pool.batch_size=4",
        "--set",
        "output.rows_per_part=4",
        "--set",
        f"ray.address={ray_session}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None and len(store.list_parts(str(out))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The dead driver's write tasks may still finish for a moment: count once the parts stop changing.
    settled, last = time.time(), -1
    while time.time() - settled < 3:
        now = len(store.list_parts(str(out)))
        if now != last:
            settled, last = time.time(), now
        time.sleep(0.2)
    first = len(store.read_output(str(out), ["id"]))
    assert 0 < first < N, f"the kill came too late or too early ({first} records written)"
    summary = enrich.run(config(m["jsonl"], out, "records_per_batch=4"))
    ids = [r["id"] for r in store.read_output(str(out), ["id"])]
    assert len(ids) == N and len(set(ids)) == N
    assert summary["skipped_already_done"] == first and summary["processed_this_run"] == N - first
    # the counts come from the parts' own tallies (none re-read), earlier run included
    assert summary["records"] == N and summary["partial"] == 2 and summary["duplicates_removed"] == 0


def test_error_rate_limit_fails_the_job_with_a_clear_message(ray_session, tmp_path):
    from caslie_core.errors import CaslieError

    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "task": "CC"}) + "\n" for i in range(6)))
    with pytest.raises(CaslieError, match="error-rate limit passed: 6 of 6"):
        enrich.run(config(str(p), tmp_path / "o", "limits.max_failed_fraction=0.5", "limits.min_records=1"))


def test_drop_duplicates_keeps_one_row_per_id(tmp_path):
    # What a late write of a killed run leaves behind: the same record in two parts.
    schema = pa.schema([("id", pa.string()), ("status", pa.string())])
    folder = tmp_path / "out" / "records" / "task=x"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{"id": "a", "status": "ok"}, {"id": "b", "status": "ok"}], schema=schema),
        folder / "part-1.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([{"id": "b", "status": "ok"}, {"id": "c", "status": "ok"}], schema=schema),
        folder / "part-2.parquet",
    )
    pq.write_table(pa.Table.from_pylist([{"id": "a", "status": "ok"}], schema=schema), folder / "part-3.parquet")
    assert ledger.drop_duplicates(str(tmp_path / "out"))[0] == 2
    ids = sorted(r["id"] for r in store.read_output(str(tmp_path / "out")))
    assert ids == ["a", "b", "c"] and len(store.list_parts(str(tmp_path / "out"))) == 2
    assert ledger.drop_duplicates(str(tmp_path / "out")) == (0, {})


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _raises_on(prompt_part: str):
    """A fake captioner (importable by the workers: `fakes`) that raises when a batch holds a chosen request."""
    import functools

    from fakes import FakeCaptioner

    return functools.partial(FakeCaptioner, raise_on=lambda image, prompt: prompt_part in prompt)


@pytest.mark.parametrize("pools", ["split", "shared"])
def test_a_model_that_raises_on_one_item_fails_that_image_and_nothing_else(ray_session, tmp_path, pools):
    """In split pools and in one shared pool (captioner and judges in one actor) alike."""
    import functools

    from fakes import FakeJudge

    m = write_catalog(tmp_path / "cat", 30, seed=12, tasks=["CC", "SA", "PRP"])
    rows = [json.loads(line) for line in open(m["jsonl"])]
    victim = next(r for r in rows if r["task"] == "sentiment_analysis")
    review = json.loads(victim["input"])["review"]
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="judges.0.pool, judges.1.pool not used") if pools == "shared" else _nothing():
        cfg = config(m["jsonl"], out, f"model_pools={pools}")
    summary = enrich.run(
        cfg,
        factories={
            "captioner": _raises_on(review),
            "judge_logits": FakeJudge,
            "judge_generate": functools.partial(FakeJudge, raise_on=lambda q: "mug" in q),
        },
    )
    written = {r["id"]: r for r in store.read_output(str(out))}
    assert sorted(written) == sorted(r["id"] for r in rows)
    hit = written[victim["id"]]
    assert hit["status"] == "partial" and hit["error"]["stage"] == "caption"
    assert "raised on one item" in hit["image_results"][0]["error"]["message"]
    judged = [r for r in written.values() if r["error"] and r["error"]["stage"] == "judge"]
    assert judged, "the judge's failing path was never exercised"  # a few titles in this catalog say "mug"
    for r in written.values():
        if r["id"] == victim["id"]:
            continue
        for res in r["image_results"]:
            vote = {v["judge"]: v for v in res["votes"]}["judge_generate"]
            assert (vote["error"] is not None) == (res["error"] is not None)  # only the judge's own failures
    assert summary["records"] == len(rows) and summary["failed"] == 0
    assert summary["partial"] == 1 + len(judged) and summary["errors_per_stage"].get("caption") == 1
    # the captioner's batch that raised was redone item by item: counted (the judge fake keeps no counts)
    assert summary["batch_fallbacks"] == {"captioner": {"batches_redone": 1, "running_at_batch_size_1": False}}
    if pools == "split":
        from helpers import scrape_metrics

        found = scrape_metrics(["caslie_batch_fallbacks_total"])["caslie_batch_fallbacks_total"]
        assert any('model="captioner"' in line for line in found), found


def test_a_stalled_plane_says_where_its_rows_wait_and_why(ray_session, tmp_path, caplog):
    """A captioner that takes 8 s to load: the records are read but no batch reaches a model pool. With
    progress_stall_s=2 the job says so, naming the operator holding the rows and Ray Data's account of the pool
    (its actor not ready yet), instead of minutes of silence; the job then ends normally."""
    import functools
    import logging

    from fakes import FakeCaptioner, FakeJudge, slow_loading

    m = write_catalog(tmp_path / "cat", 40, seed=21, tasks=["CC"])
    cfg = config(m["jsonl"], tmp_path / "out", "progress_stall_s=2")
    factories = {"captioner": functools.partial(slow_loading, 8, FakeCaptioner)}
    factories.update({j.name: FakeJudge for j in cfg.judges})
    with caplog.at_level(logging.WARNING, logger="caslie"):
        summary = enrich.run(cfg, factories=factories)
    assert summary["records"] == 40 and summary["failed"] == 0
    said = [r.getMessage() for r in caplog.records if "[enrich] stalled" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    line = said[0]
    assert "records read but no batch has reached a model pool" in line
    assert "CaptionActor" in line and "Actors: 1" in line  # the pool, as Ray Data accounts for it


def test_a_model_that_fails_everything_fails_the_job_with_a_clear_message(ray_session, tmp_path):
    import functools

    from fakes import FakeCaptioner

    from caslie_core.errors import CaslieError

    m = write_catalog(tmp_path / "cat", 24, seed=13, tasks=["CC"])
    cfg = config(m["jsonl"], tmp_path / "out", "captioner.pool.batch_size=4", "records_per_batch=4")
    with pytest.raises(CaslieError, match=r"the captioner failed on every item of (\d+) batches in a row") as e:
        enrich.run(cfg, factories={"captioner": functools.partial(FakeCaptioner, raise_always=True)})
    # 3 is the limit; the actor holds up to 2 tasks (blocks of records_per_batch rows), so the error that reaches
    # the driver may be the next batch's, one past it
    assert int(re.search(r"of (\d+) batches", str(e.value)).group(1)) in (3, 4)
    assert "not the data" in str(e.value) and "rerun the same command to resume" in str(e.value)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` (a decompression bomb as far as the header goes)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_every_kind_of_bad_item_in_one_catalog(ray_session, tmp_path):
    """Bad images of every kind and malformed records in one catalog: the job finishes, every record once,
    each with its status and the stage of its error (no item stops the job)."""
    root = tmp_path / "served"
    server = ImageServer(root / "images", slow_s=2.0, drip_s=1.0)
    try:
        m = write_catalog(root, 16, seed=21, tasks=["CC"], base_url=server.url)
        rows = [json.loads(line) for line in open(m["jsonl"])]
        img = root / "images"
        gif = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
        gif[0].save(img / "anim.gif", "GIF", save_all=True, append_images=gif[1:])
        Image.new("I;16", (30, 20), 3000).save(img / "deep.png", "PNG")
        Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(img / "cmyk.jpg", "JPEG")
        Image.new("P", (20, 20), 1).save(img / "pal.png", "PNG", transparency=1)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees
        Image.new("RGB", (40, 20), (9, 9, 9)).save(img / "rot.jpg", "JPEG", exif=exif)
        full = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(full, "PNG")
        (img / "trunc.png").write_bytes(full.getvalue()[:60])
        (img / "page.html").write_text("<!doctype html><html><body>Sorry, this product is gone</body></html>")
        (img / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
        (img / "bomb.png").write_bytes(_png_claiming(30_000, 30_000))
        u = server.url
        cases = {  # first image URL -> (status, stage of the image's error)
            f"{u}/anim.gif": ("ok", None),
            f"{u}/deep.png": ("ok", None),
            f"{u}/cmyk.jpg": ("ok", None),
            f"{u}/pal.png": ("ok", None),
            f"{u}/rot.jpg": ("ok", None),
            f"{u}/flaky/cmyk.jpg": ("ok", None),  # 500, then 200
            f"{u}/retry-after/deep.png": ("ok", None),  # 429 with Retry-After: 1, then 200
            f"{u}/empty": ("partial", "decode"),  # 200 with an empty body
            f"{u}/trunc.png": ("partial", "decode"),
            f"{u}/page.html": ("partial", "decode"),
            f"{u}/logo.svg": ("partial", "decode"),
            f"{u}/bomb.png": ("partial", "decode"),
            f"{u}/missing/x.png": ("partial", "fetch"),  # 404
            f"{u}/drip/cmyk.jpg": ("partial", "fetch"),  # one byte a second: past the total deadline
        }
        expected = {}
        for row, (url, want) in zip(rows, cases.items()):
            row["images"] = json.dumps([url])
            expected[row["id"]] = want
        lines = [json.dumps(r) for r in rows[: len(cases)]]
        malformed = [
            "{not json",
            "[" * 100_000 + "]" * 100_000,  # nesting deeper than any parser's recursion limit
            # 400 levels deep: a valid record (its nested value travels as JSON text, no parser limit hit)
            '{"id": "deep-field", "task": "CC", "instruction": "i", "options": ["A: x", "B: y"], "images": '
            + json.dumps([f"{u}/cmyk.jpg"])
            + ', "input": {"title": "t", "x": '
            + "[" * 400
            + "]" * 400
            + "}}",
            json.dumps({**rows[-1], "id": "images-not-a-list", "images": 7}),
            json.dumps({"id": "no-task", "instruction": "x"}),
        ]
        path = tmp_path / "records.jsonl"
        path.write_text("\n".join(lines + malformed) + "\n")
        cfg = config(
            path, tmp_path / "out", *HTTP_SETTINGS[:2], "fetch.read_timeout=2", "fetch.total_timeout=3",
            "fetch.retries=2", "fetch.backoff=0.01", "decode.max_pixels=1000000",
        )  # fmt: skip
        summary = enrich.run(cfg)
    finally:
        server.close()
    written = store.read_output(str(tmp_path / "out"))
    assert len(written) == len(lines) + len(malformed) == len({r["id"] for r in written})
    by_id = {r["id"]: r for r in written}
    for rid, (status, stage) in expected.items():
        row = by_id[rid]
        assert row["status"] == status, (row["image_results"][0]["url"], row["error"])
        res = row["image_results"][0]
        assert (res["error"] or {}).get("stage") == stage, (res["url"], res["error"])
        assert (row["error"] or {}).get("stage") == stage and (res["caption"] is None) == (stage is not None)
    failed = [r for r in written if r["status"] == "failed"]
    assert len(failed) == len(malformed) - 1 and all(r["error"]["stage"] == "validate" for r in failed)
    assert {"images-not-a-list", "no-task"} <= {r["id"] for r in failed} and by_id["deep-field"]["status"] == "ok"
    assert summary["failed"] == len(failed) and summary["records"] == len(written)
    assert summary["errors_per_stage"]["decode"] == 5 and summary["errors_per_stage"]["fetch"] == 2


def test_a_pool_the_cluster_cannot_offer_fails_at_its_start_timeout_naming_the_resource(ray_session, tmp_path):
    """A GPU captioner pool on the suite's CPU-only cluster: the job fails after `start_timeout_s` naming the key
    and the resource, having written nothing (before: it waited forever while the CPU stages ran ahead)."""
    import time

    from caslie_core.errors import CaslieError

    m = write_catalog(tmp_path / "cat", 12, seed=14, tasks=["CC"])
    cfg = config(m["jsonl"], tmp_path / "out", "captioner.pool.num_gpus=1", "captioner.pool.start_timeout_s=2")
    t = time.monotonic()
    with pytest.raises(CaslieError, match=r"captioner.pool asks \{CPU: .*GPU: 1\}") as e:
        enrich.run(cfg)
    assert "start_timeout_s=2s" in str(e.value) and "captioner.pool.num_gpus: 0" in str(e.value)
    assert time.monotonic() - t < 30
    assert not list((tmp_path / "out").rglob("*.parquet"))
    # the failed job leaves neither its timeline's helper actor nor its node sampler behind
    import threading

    import ray

    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("caslie-run-")]
    assert not [th for th in threading.enumerate() if th.name == "caslie-timeline" and th.is_alive()]


def test_a_cluster_that_cannot_grow_fails_at_once(ray_session):
    from caslie_core.errors import CaslieError
    from ray_jobs.capacity import wait_for_pools

    with pytest.raises(CaslieError, match=r"cannot grow .* no node can ever offer \{GPU: 1\}"):
        wait_for_pools([("judges.0.pool", {"CPU": 0.25, "GPU": 1.0}, 600.0)], can_grow=False)
    assert wait_for_pools([("judges.0.pool", {"CPU": 0.25}, 600.0)], can_grow=False) == {"judges.0.pool": 0.0}


def test_enrichment_counts_and_stage_times_reach_rays_metrics_endpoint(ray_session, tmp_path):
    from helpers import scrape_metrics

    m = write_catalog(tmp_path / "cat", 12, seed=15, tasks=["CC"], broken_images=1)
    summary = enrich.run(config(m["jsonl"], tmp_path / "out"))
    assert summary["records"] == 12
    names = [
        "caslie_enrich_records_total",
        "caslie_enrich_images_total",
        "caslie_enrich_captions_kept_total",
        "caslie_enrich_image_errors_total",
        "caslie_enrich_stage_batches_total",
    ]
    found = scrape_metrics(names)
    assert all(found.values()), {n: len(v) for n, v in found.items()}
    assert any('status="ok"' in line for line in found["caslie_enrich_records_total"])
    assert any('status="partial"' in line for line in found["caslie_enrich_records_total"])
    assert any('task="CC"' in line for line in found["caslie_enrich_images_total"])
    stages = " ".join(found["caslie_enrich_stage_batches_total"])
    assert all(f'stage="{s}"' in stages for s in ("fetch_decode", "caption", "judge")), stages[:500]


def test_every_enrichment_panel_has_data_in_prometheus_during_a_demo_sized_run(prometheus, tmp_path):
    """The demo's catalog size (140 records, 3 broken images) on the demo config and tiny models (the captioner's
    first batch raises, and is redone item by item): a real Prometheus scraping every 2 s sees every
    enrichment and model panel of the shipped dashboard move, and the written counters rise by the summary's."""
    from fakes import CaptionerRaisingOnce
    from helpers import assert_panels_show_data

    m = write_catalog(tmp_path / "cat", 140, seed=16, broken_images=3)
    factories = {"captioner": CaptionerRaisingOnce}
    written = "sum by (status) (ray_caslie_enrich_records_total)"
    prometheus.wait_scraped()  # what earlier jobs of this session recorded is scraped before we look
    start = time.time()
    before = prometheus.value(written, start)
    summary = enrich.run(config(m["jsonl"], tmp_path / "out"), factories=factories)
    end = time.time()
    prometheus.wait_scraped()
    assert summary["records"] == 140 and summary["batch_fallbacks"]["captioner"]["batches_redone"] >= 1
    tops = assert_panels_show_data(prometheus, ("Enrichment:", "Models:"), start, end)
    assert all(0 < share <= 1 for share in tops["Enrichment: kept share of the captions written, by task"])
    after = prometheus.value(written, time.time())
    rose = {dict(k)["status"]: v - before.get(k, 0.0) for k, v in after.items()}
    assert {s: rose.get(s, 0.0) for s in ("ok", "partial", "failed")} == {
        s: float(summary[s]) for s in ("ok", "partial", "failed")
    }, (rose, summary)
