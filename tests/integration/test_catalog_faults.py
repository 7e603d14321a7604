"""No record lost to how a catalog sits on disk or to a damaged output (issue 35), on the real job and local Ray,
with `caslie synth` catalogs: every input id exactly once after the documented recovery, or a clear refusal."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from helpers import ROOT

from caslie_core.config import EnrichConfig, load_config
from caslie_core.errors import CaslieError, SourceError
from caslie_core.io import store
from caslie_core.io.lock import NAME as LOCK
from caslie_core.synthetic import write_catalog
from ray_jobs import enrich

pytestmark = pytest.mark.slow
DEMO = str(ROOT / "configs" / "enrich-demo.yaml")
FAST = ["output.report_per_task=0"]


def config(inp, out, *extra):
    return load_config(EnrichConfig, DEMO, [f"input.path={inp}", f"output.path={out}", *FAST, *extra])


def ids_of(path) -> list[str]:
    return [json.loads(line)["id"] for line in open(path)]


def written(out) -> list[dict]:
    return store.read_output(str(out), ["id", "status", "error"])


def test_a_folder_of_two_formats_is_refused_naming_them_and_input_format_picks_one(ray_session, tmp_path):
    a = write_catalog(tmp_path / "a", 6, seed=21)
    b = write_catalog(tmp_path / "b", 5, seed=22)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "one.jsonl").write_bytes(open(a["jsonl"], "rb").read())
    (folder / "two.parquet").write_bytes(open(b["parquet"], "rb").read())
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(SourceError, match=r"two formats: .*one\.jsonl.*two\.parquet.*input\.format"):
        enrich.run(config(folder, tmp_path / "out"))
    summary = enrich.run(config(folder, tmp_path / "out", "input.format=parquet"))
    rows = written(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(ids_of(b["jsonl"])) and summary["failed"] == 0


def test_the_folder_caslie_synth_writes_is_refused_not_read_twice(ray_session, tmp_path):
    write_catalog(tmp_path / "cat", 4, seed=23)
    with pytest.raises(SourceError, match=r"records\.jsonl.*records\.parquet") as e:
        enrich.run(config(tmp_path / "cat", tmp_path / "out"))
    assert "manifest" not in str(e.value)
    out = subprocess.run(  # `caslie validate` on the same folder says the same
        [sys.executable, "-m", "ray_jobs.cli", "validate", str(tmp_path / "cat")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "two formats" in out.stderr and "Traceback" not in out.stderr


def test_files_of_two_formats_listed_one_by_one_and_awkward_json_lines_lose_no_record(ray_session, tmp_path):
    """JSON Lines as other tools write them (a BOM, CRLF, raw U+2028/U+0085 inside strings: legal JSON) and a
    Parquet file, listed one by one: each read by its own reader, every id once, none failed."""
    m = write_catalog(tmp_path / "cat", 8, seed=26)
    b = write_catalog(tmp_path / "b", 5, seed=25)
    rows = [json.loads(line) for line in open(m["jsonl"])]
    rows[0]["instruction"] += "\u2028and on"
    rows[3]["instruction"] += "\u0085next"
    awkward = tmp_path / "awkward.jsonl"
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    awkward.write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = tmp_path / "out"
    wide = "judges.0.pool.max_size=2"  # a pool wider than one actor: JSON lines go through the parallel reader
    summary = enrich.run(config(f"[{awkward},{b['parquet']}]", out, wide))
    got = written(out)
    assert sorted(r["id"] for r in got) == sorted([r["id"] for r in rows] + ids_of(b["jsonl"]))
    assert summary["failed"] == 0 and all(r["status"] != "failed" for r in got)


def test_a_damaged_part_is_quarantined_and_its_records_redone_and_temporaries_swept(ray_session, tmp_path):
    m = write_catalog(tmp_path / "cat", 16, seed=27)
    out = tmp_path / "out"
    enrich.run(config(m["jsonl"], out, "records_per_batch=4", "output.rows_per_part=4"))
    parts = sorted(store.list_parts(str(out)))
    assert len(parts) >= 3
    truncated, scribbled = parts[0], parts[1]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    data = bytearray(open(scribbled, "rb").read())
    data[len(data) // 3 : len(data) // 3 + 40] = os.urandom(40)  # garbage inside the data pages, footer intact
    open(scribbled, "wb").write(bytes(data))
    lost = {r for p in parts[1:2] for r in pq.read_table(p, columns=["id"]).column("id").to_pylist()}
    leftover = os.path.join(os.path.dirname(parts[2]), ".tmp-dead-writer-part.parquet")
    open(leftover, "wb").write(b"half a part")

    summary = enrich.run(config(m["jsonl"], out, "records_per_batch=4", "output.rows_per_part=4"))
    ids = [r["id"] for r in written(out)]
    assert sorted(ids) == sorted(ids_of(m["jsonl"]))  # every record once: the damaged parts' records redone
    assert summary["processed_this_run"] >= len(lost) + 1
    moved = {q["part"]: q for q in summary["quarantined"]}
    assert set(moved) == {truncated, scribbled} and all(os.path.exists(q["moved_to"]) for q in moved.values())
    assert all("/quarantine/" in q["moved_to"] and q["why"] for q in moved.values())
    assert not os.path.exists(leftover)


def test_a_second_run_into_the_same_output_refuses_and_a_stale_lock_is_taken_over(ray_session, tmp_path, caplog):
    m = write_catalog(tmp_path / "cat", 4, seed=28)
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    live = {"run_id": "other", "user": "u", "host": os.uname().nodename, "pid": os.getppid(), "started": now}
    (out / LOCK).write_text(json.dumps({**live, "seen": now}))
    with pytest.raises(CaslieError, match=r"in use by another run: run other .* another output\.path"):
        enrich.run(config(m["jsonl"], out))
    assert not store.list_parts(str(out))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({**live, "pid": dead.pid, "seen": now}))
    with caplog.at_level("WARNING", logger="caslie"):
        summary = enrich.run(config(m["jsonl"], out))
    assert summary["records"] == 4 and "taking over the lock of run other" in caplog.text
    assert not (out / LOCK).exists()  # released at the end


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_job_ends_with_one_line_and_a_rerun_finishes_it(ray_session, tmp_path, sig):
    n = 120
    m = write_catalog(tmp_path / "cat", n, seed=29)
    out = tmp_path / "out"
    sets = ["records_per_batch=4", "output.rows_per_part=4", f"ray.address={ray_session}", *FAST]
    args = [sys.executable, "-m", "ray_jobs.enrich", "--config", DEMO, "--set", f"input.path={m['jsonl']}"]
    args += ["--set", f"output.path={out}"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None and not store.list_parts(str(out)):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    err = stderr.decode(errors="replace")
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith(f"caslie enrich: error: interrupted by {sig.name}") and "rerun the same command" in last
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (out / LOCK).exists()
    if sig == signal.SIGTERM:  # the rerun is the same after either signal (and after a kill: test_enrich)
        enrich.run(config(m["jsonl"], out, "records_per_batch=4", "output.rows_per_part=4"))
        ids = [r["id"] for r in written(out)]
        assert sorted(ids) == sorted(ids_of(m["jsonl"]))


def test_an_output_that_cannot_be_written_ends_with_one_line(tmp_path):
    m = write_catalog(tmp_path / "cat", 2, seed=30)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "ray_jobs.cli", "enrich", DEMO]
    args += ["--set", f"input.path={m['jsonl']}", "--set", f"output.path={blocker}/out"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("caslie enrich: error: ") and f"{blocker}/out" in last
    assert "started a local Ray cluster" not in out.stderr  # it failed before Ray was started


def test_ids_the_input_repeats_keep_their_first_copy_are_reported_and_can_fail_the_job(ray_session, tmp_path, caplog):
    m = write_catalog(tmp_path / "cat", 12, seed=31)
    rows = [json.loads(line) for line in open(m["jsonl"])]
    again = [{**r, "instruction": "a LATER copy: " + r["instruction"]} for r in rows[:6]]
    catalog = tmp_path / "repeats.jsonl"  # six ids twice, the later copies different: spread over parts
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows + again))
    out = tmp_path / "out"
    small = ["records_per_batch=3", "output.rows_per_part=3"]
    with caplog.at_level("INFO", logger="caslie"):
        summary = enrich.run(config(catalog, out, *small))
    got = store.read_output(str(out), ["id", "instruction"])
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # one row per id
    assert not [r for r in got if r["instruction"].startswith("a LATER copy")]  # the first copy, whatever its part
    repeats = summary["repeated_ids"]
    assert repeats["count"] == 6 and sorted(repeats["ids"]) == sorted(r["id"] for r in rows[:6])
    assert "6 ids repeated in the input, the first copy of each kept" in caplog.text
    with pytest.raises(CaslieError, match=r"on_duplicate_id=error: 6 ids repeated"):
        enrich.run(config(catalog, tmp_path / "out2", *small, "input.on_duplicate_id=error"))


def test_a_write_that_fails_midway_ends_with_one_line_naming_what_is_written(ray_session, tmp_path):
    m = write_catalog(tmp_path / "cat", 6, seed=32, tasks=["CC"])
    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    (out / "records" / "task=category_classification").write_text("a file where the parts' folder should be")
    with pytest.raises(CaslieError) as e:
        enrich.run(config(m["jsonl"], out))
    msg = str(e.value)
    assert msg.startswith("cannot write the output (") and "task=category_classification" in msg
    assert "records of this run are written in" in msg and msg.endswith("rerun the same command to resume")
    assert not (out / LOCK).exists()


def test_a_file_that_is_not_utf8_fails_with_one_line_naming_it_as_validate_does(ray_session, tmp_path):
    m = write_catalog(tmp_path / "cat", 4, seed=33)
    bad = tmp_path / "latin1.jsonl"
    lines = open(m["jsonl"], "rb").read().splitlines()
    bad.write_bytes(b"\n".join(lines[:2] + [lines[2].replace(b'"id"', b'"id", "note": "caf\xe9"', 1)] + lines[3:]))
    with pytest.raises(CaslieError, match=r"cannot read the input: .*latin1\.jsonl: line 3 is not UTF-8"):
        enrich.run(config(bad, tmp_path / "out", "judges.0.pool.max_size=2"))  # the parallel reader
    with pytest.raises(SourceError, match="latin1.jsonl"):
        from caslie_core.io.sources import load_records

        load_records(str(bad))
