"""The result store in the enrichment stages, without Ray: a rerun takes what is stored and computes only what
changed, and its output is the cold run's."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from fakes import FakeCaptioner, FakeJudge

from caslie_core.enrichment import pipeline
from caslie_core.enrichment.stored import StoreUse
from caslie_core.images import FetchPolicy
from caslie_core.io.results import ResultIndex, ResultStore
from caslie_core.synthetic import write_catalog

JUDGES = {"a": "judge-a@1", "b": "judge-b@1"}


def _run(rows, path, run_id, *, reads=True, writes=True, captioner="cap@1", research=False):
    use = StoreUse(str(path), run_id, reads, writes, captioner, JUDGES, {"a": research, "b": research})
    lookup = ResultIndex(str(path), use.models()) if reads else None
    cap, judges = FakeCaptioner(), {"a": FakeJudge("red"), "b": FakeJudge("ring")}
    out = pipeline.run_local(
        rows,
        policy=FetchPolicy(allow_local_files=True),
        captioner=cap,
        judges=judges,
        size=32,
        max_pixels=10**7,
        provenance={"run_id": run_id},
        batch=4,
        store=use,
        lookup=lookup,
        research=research,  # every image judged, a missing caption as "NA" (the research CQE)
    )
    return {o["id"]: o for o in out}, cap, judges


def _decisions(out):
    return {
        rid: [(r["caption"], [(v["judge"], v["vote"]) for v in r["votes"]], r["kept"]) for r in o["image_results"]]
        for rid, o in out.items()
    }


@pytest.mark.parametrize("research", [False, True])
def test_a_rerun_takes_stored_results_and_computes_only_changed_images(tmp_path, research):
    m = write_catalog(tmp_path / "cat", 24, seed=7, broken_images=2)
    rows = [{"text": line} for line in open(m["jsonl"])]
    run = functools.partial(_run, research=research)
    cold, cap, judges = run(rows, tmp_path / "store", "r1")
    captioned = cap.items
    assert captioned > 20 and judges["a"].items > 0
    ResultStore(str(tmp_path / "store")).merge_run("r1")

    warm, cap2, judges2 = run(rows, tmp_path / "store", "r2")
    failed = sum(r["error"] is not None for o in cold.values() for r in o["image_results"])
    assert cap2.calls == 0  # nothing new: no caption; votes only where images failed (research judges them too)
    assert judges2["a"].items == judges2["b"].items == (failed if research else 0)
    assert _decisions(warm) == _decisions(cold)
    for o in warm.values():
        for r in o["image_results"]:
            if r["error"] is None:
                assert r["stored_from"] == "r1" and all(v["stored_from"] == "r1" for v in r["votes"])
            else:  # failed images are never stored: fetched and failed again
                assert r["stored_from"] is None
    assert pipeline.tally(list(warm.values()))["stored_captions"] == captioned

    # one picture changes (new bytes at the same path): only it is captioned and judged again
    from PIL import Image

    changed = Path(_urls(rows[0])[0])
    Image.new("RGB", (40, 40), (3, 200, 9)).save(changed, format=Image.open(changed).format)
    again, cap3, judges3 = run(rows, tmp_path / "store", "r3")
    results = [r for o in again.values() for r in o["image_results"] if r["error"] is None]
    fresh = [r for r in results if r["stored_from"] is None]
    assert fresh and all(Path(r["url"]) == changed for r in fresh)  # everything else: the store's
    assert all(r["stored_from"] in ("r1",) for r in results if Path(r["url"]) != changed)
    assert 1 <= cap3.items <= len(fresh) and 1 <= judges3["a"].items <= len(fresh) + (failed if research else 0)


def _urls(row: dict) -> list[str]:
    images = json.loads(row["text"])["images"]
    return images if isinstance(images, list) else json.loads(images)


def test_other_models_and_settings_miss_and_read_only_writes_nothing(tmp_path):
    m = write_catalog(tmp_path / "cat", 10, seed=8)
    rows = [{"text": line} for line in open(m["jsonl"])]
    _run(rows, tmp_path / "store", "r1")
    before = ResultStore(str(tmp_path / "store")).stats()
    _, cap, _ = _run(rows, tmp_path / "store", "r2", captioner="cap@2", writes=False)  # another revision
    assert cap.items > 0
    assert ResultStore(str(tmp_path / "store")).stats()["captions"]["rows"] == before["captions"]["rows"]
    _, cap, judges = _run(rows, tmp_path / "store", "r3", reads=False)  # write_only: everything computed again
    assert cap.items > 0 and judges["a"].items > 0
