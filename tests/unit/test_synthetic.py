import json

from PIL import Image

from caslie_core.io.sources import load_records
from caslie_core.synthetic import write_catalog
from caslie_core.tasks import TASKS


def test_catalog_is_valid_has_all_tasks_images_and_follows_rules(tmp_path):
    m = write_catalog(tmp_path, 28, seed=3, broken_images=3)
    res = load_records(m["jsonl"], mode="strict")
    assert len(res.records) == 28 and {r.spec.abbr for r in res.records} == set(TASKS)
    assert [r.id for r in load_records(m["parquet"]).records] == [r.id for r in res.records]
    broken = {b["image"] for b in m["broken_images"]}
    assert len(broken) == 3
    formats, opened = set(), 0
    for r in res.records:
        for url in r.images:
            if url in broken:
                continue
            with Image.open(url) as im:
                formats.add(im.format)
                opened += 1
        if r.spec.abbr == "PSI":
            assert ("incompatible" in r.input["product title"]) == (r.output == "no")
        if r.spec.abbr == "SR":
            assert "bestseller" in r.options["ABC".index(r.output)]
    assert formats == {"PNG", "JPEG"} and opened == m["images"] - 3


def test_same_seed_same_catalog(tmp_path):
    a = write_catalog(tmp_path / "a", 10, seed=1)
    b = write_catalog(tmp_path / "b", 10, seed=1)
    ra = [json.loads(line) for line in open(a["jsonl"])]
    rb = [json.loads(line) for line in open(b["jsonl"])]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)


def test_base_url_and_task_subset(tmp_path):
    m = write_catalog(tmp_path, 4, tasks=["cc", "AP"], base_url="http://127.0.0.1:9/img")
    recs = load_records(m["jsonl"]).records
    assert {r.spec.abbr for r in recs} == {"CC", "AP"}
    assert all(u.startswith("http://127.0.0.1:9/img/") for r in recs for u in r.images)
