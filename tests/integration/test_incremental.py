"""Incremental enrichment on a real local Ray cluster with the real tiny models: a refreshed catalog runs only its
changed images through the models; the rest comes from the result store (`store.path`)."""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from fakes import Logged
from helpers import ROOT
from PIL import Image

from caslie_core.config import EnrichConfig, load_config
from caslie_core.io import store
from caslie_core.io.results import ResultStore
from caslie_core.models.registry import build_captioner, build_judge
from caslie_core.synthetic import write_catalog
from ray_jobs import enrich

pytestmark = pytest.mark.slow
DEMO = str(ROOT / "configs" / "enrich-demo.yaml")


def _run(tmp: Path, name: str, catalog, *extra):
    """One enrichment into `tmp/name` whose models log their loads and items to `tmp/name-<model>.log`."""
    cfg = load_config(EnrichConfig, DEMO, [f"input.path={catalog}", f"output.path={tmp / name}", *extra])
    logs = {"captioner": tmp / f"{name}-captioner.log", **{j.name: tmp / f"{name}-{j.name}.log" for j in cfg.judges}}
    factories = {
        "captioner": functools.partial(
            Logged, functools.partial(build_captioner, cfg.captioner), str(logs["captioner"])
        )
    }
    for j in cfg.judges:
        factories[j.name] = functools.partial(Logged, functools.partial(build_judge, j), str(logs[j.name]))
    summary = enrich.run(cfg, factories=factories)
    calls = {m: Counter(p.read_text().split()) if p.exists() else Counter() for m, p in logs.items()}
    rows = {r["id"]: r for r in store.read_output(str(tmp / name), ["id", "status", "image_results"])}
    return summary, calls, rows


def _decisions(rows: dict) -> dict:
    return {
        rid: [(r["caption"], [(v["judge"], v["vote"]) for v in r["votes"]], r["kept"]) for r in row["image_results"]]
        for rid, row in rows.items()
    }


def _snapshot(m: dict, folder: Path) -> tuple[Path, set[str]]:
    """The next day's catalog: two pictures with new bytes under the same path, two products gone, two new ones
    (with pictures of their own); the URLs whose content is new."""
    rows = [json.loads(line) for line in open(m["jsonl"])]
    urls = [json.loads(r["images"]) for r in rows]
    counts = Counter(u for us in urls for u in us)
    changed = [u for us in urls[2:] for u in us if counts[u] == 1][:2]
    for k, u in enumerate(changed):
        Image.new("RGB", (48, 48), (200, 30 * k, 90)).save(u, format=Image.open(u).format)
    new = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        src, pics = rows[2 + k], []
        for n, _ in enumerate(json.loads(rows[2 + k]["images"])):  # as many pictures as the task takes, all new
            pics.append(str(folder / f"new-{k}-{n}.png"))
            Image.new("RGB", (48, 48), (10, 250 - 40 * k, 60 * n)).save(pics[-1], "PNG")
        new.append({**src, "id": f"new-{k}", "images": json.dumps(pics)})
    out = folder / "records.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[2:] + new))  # the first two products are gone
    return out, set(changed) | {u for r in new for u in json.loads(r["images"])}


def test_a_refreshed_catalog_runs_only_its_changed_images_through_the_models(ray_session, tmp_path):
    """Day 1 by two runs at once into one store (one pool each: both fit 2 CPUs); day 2 (2 pictures changed, 2
    products gone, 2 new) runs only the new pictures through the models and writes what a cold run writes; day 2
    again loads no model at all."""
    m = write_catalog(tmp_path / "day1", 24, seed=21)
    kept = f"store.path={tmp_path / 'store'}"
    day1: dict = {}

    def day1_run(name: str) -> None:
        day1[name] = _run(tmp_path, name, m["jsonl"], kept, "model_pools=shared")

    both = [threading.Thread(target=day1_run, args=(n,)) for n in ("day1-a", "day1-b")]
    for t in both:
        t.start()
    for t in both:
        t.join(300)
    assert set(day1) == {"day1-a", "day1-b"} and all(s["records"] == 24 for s, _, _ in day1.values())
    assert _decisions(day1["day1-a"][2]) == _decisions(day1["day1-b"][2])
    made = day1["day1-a"][1]["captioner"]["caption"]
    stats = ResultStore(str(tmp_path / "store")).stats()
    assert made > 0 and stats["captions"]["keys"] == made  # both wrote them (rows), each key once
    assert stats["captions"]["parts"] == 2 and stats["captions"]["rows"] >= made  # each run's parts merged
    runs = {s["run_id"] for s, _, _ in day1.values()}

    day2, new_urls = _snapshot(m, tmp_path / "day2")
    second, calls2, rows2 = _run(tmp_path, "day2-out", day2, kept)
    results = [r for row in rows2.values() for r in row["image_results"] if r["error"] is None]
    fresh = [r for r in results if r["stored_from"] is None]
    assert {r["url"] for r in fresh} == new_urls  # every changed or new picture, and nothing else, was computed
    assert all(r["stored_from"] in runs for r in results if r["url"] not in new_urls)
    assert 0 < calls2["captioner"]["caption"] <= len(fresh) and calls2["captioner"]["load"] >= 1
    assert second["store"]["captions_from_store"] == len(results) - len(fresh)
    assert second["records"] == 24 and set(rows2) == {json.loads(line)["id"] for line in open(day2)}

    cold, _, rows_cold = _run(tmp_path, "day2-cold", day2, "store.mode=off")  # the same models, no store
    assert cold["store"] is None and _decisions(rows2) == _decisions(rows_cold)

    again, calls3, rows3 = _run(tmp_path, "day2-again", day2, kept)  # nothing new: no model loads at all
    assert all(c["load"] == 0 and not c["caption"] and not c["vote"] for c in calls3.values()), calls3
    assert again["store"]["captions_from_store"] == len(results) and _decisions(rows3) == _decisions(rows2)
