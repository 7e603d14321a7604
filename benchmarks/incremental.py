"""Incremental enrichment (issue 39): what a refreshed catalog's rerun costs against a cold run, and what the result
store's lookups cost at 1M stored keys. Writes JSON.

    python benchmarks/incremental.py [--records 1050] [--changed 0.05] [--keys 1000000] [--shards 1]
        [--out benchmarks/results/incremental-cpu-2core.json]

One local Ray session (2 CPUs, as the tests), the demo's world (`configs/enrich-world.yaml`: the trained world
captioner and judge, 32-pixel pictures, 16-token captions):
  1. cold: the world catalog of `--records` records enriched with `store.path` set (everything computed, stored);
  2. the next day's catalog: `--changed` of the pictures get new bytes under the same path (a pixel changed), half
     that share of the products are gone and as many new ones come (their pictures new files);
  3. rerun: the new catalog into a new output with the same store.
For both runs: wall (`summary.json`: from a connected Ray to the summary) and model time (the seconds inside the
captioner's and judges' calls, summed over calls: each model is wrapped to time them) and model calls (items).
Target (issue 39): rerun model time <= 0.1 of cold, rerun wall <= 0.25 of cold. The tiny models take less time
than the plane (fetching and decoding every picture, which the digest needs, and the pools' start), so the wall
share is measured a second time with `--captioner-ms/--judge-ms`: a model cost per item added to each call (slept
inside it), standing for a big VLM and judges on GPUs, where the models are most of a cold run.

Then the lookups at scale: a store holding `--keys` caption keys and as many vote keys per judge (the world
models' identities), loaded by `--shards` lookup actors (their load time), and `look_up` (the fetch task's step)
on batches of 128 records of 1.9 images each, through the actors as the plane calls them: seconds per record.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Timed:
    """A model built by `make`, whose calls are timed: one line "<items> <seconds>" per call appended to `log`.
    `ms_per_item`: a model cost added to each call (slept), standing for a big model on a GPU."""

    def __init__(self, make, log: str, ms_per_item: float = 0.0) -> None:
        self.log, self.inner, self.ms = log, make(), ms_per_item

    def _timed(self, fn, items):
        t = time.perf_counter()
        out = fn(items[0], *items[1:])
        time.sleep(self.ms * len(items[0]) / 1000)
        with open(self.log, "a") as fh:
            fh.write(f"{len(items[0])} {time.perf_counter() - t:.6f}\n")
        return out

    def caption(self, images, prompts):
        return self._timed(self.inner.caption, (images, prompts))

    def vote(self, questions):
        return self._timed(self.inner.vote, (questions,))

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _run(cfg_path: Path, catalog: Path, out: Path, store: Path, logs: Path, ms: dict) -> dict:
    from caslie_core.config import EnrichConfig, load_config
    from caslie_core.models.registry import build_captioner, build_judge
    from ray_jobs import enrich

    cfg = load_config(
        EnrichConfig,
        cfg_path,
        [f"input.path={catalog}", f"output.path={out}", f"store.path={store}", "output.report_per_task=0"],
    )
    logs.mkdir(parents=True, exist_ok=True)
    captioner = functools.partial(build_captioner, cfg.captioner)
    factories = {"captioner": functools.partial(Timed, captioner, str(logs / "captioner"), ms["captioner"])}
    for j in cfg.judges:
        judge = functools.partial(build_judge, j)
        factories[j.name] = functools.partial(Timed, judge, str(logs / j.name), ms["judge"])
    s = enrich.run(cfg, factories=factories)
    models = {}
    for f in logs.iterdir():
        lines = [line.split() for line in f.read_text().splitlines()]
        models[f.name] = {
            "calls": len(lines),
            "items": sum(int(a) for a, _ in lines),
            "seconds": sum(float(b) for _, b in lines),
        }
    return {
        "records": s["records"],
        "wall_seconds": s["wall_seconds"],
        "dataset_seconds": s["dataset_seconds"],
        "model_seconds": round(sum(m["seconds"] for m in models.values()), 3),
        "models": models,
        "store": s["store"],
    }


def _next_day(catalog: dict, folder: Path, changed: float, seed: int = 1) -> dict:
    """The refreshed catalog: pictures with new bytes, products gone, new products."""
    from PIL import Image

    rng = random.Random(seed)
    rows = [json.loads(line) for line in open(catalog["jsonl"])]
    pictures = sorted({u for r in rows for u in json.loads(r["images"])})
    touched = rng.sample(pictures, max(1, round(changed * len(pictures))))
    for u in touched:  # one pixel changed: the same look, new bytes
        im = Image.open(u).convert("RGB")
        x, y = rng.randrange(im.width), rng.randrange(im.height)
        r, g, b = im.getpixel((x, y))
        im.putpixel((x, y), ((r + 7) % 256, g, b))
        im.save(u, format="PNG" if u.endswith(".png") else "JPEG", quality=95)
    k = max(1, round(changed / 2 * len(rows)))
    gone = set(rng.sample(range(len(rows)), k))
    new = []
    for i, src in enumerate(rng.sample([r for n, r in enumerate(rows) if n not in gone], k)):
        urls = []
        for j, u in enumerate(json.loads(src["images"])):
            im = Image.open(u).convert("RGB")
            im.putpixel((0, 0), (i % 256, j, 200))
            path = folder / f"new-{i}-{j}.png"
            folder.mkdir(parents=True, exist_ok=True)
            im.save(path, "PNG")
            urls.append(str(path))
        new.append({**src, "id": f"new-{i}", "images": json.dumps(urls)})
    kept = [r for n, r in enumerate(rows) if n not in gone] + new
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    n_images = sum(len(json.loads(r["images"])) for r in kept)
    return {
        "jsonl": path,
        "records": len(kept),
        "pictures_changed": len(touched),
        "gone": k,
        "new": k,
        "images": n_images,
    }


def lookups_at_scale(keys: int, shards: int, work: Path) -> dict:
    """Load `keys` stored captions (and as many votes per judge) into lookup actors; time `look_up` per record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from caslie_core.config import EnrichConfig, load_config
    from caslie_core.enrichment.stored import StoreUse, look_up
    from caslie_core.io.results import _schema, result_key
    from caslie_core.items import ImageSlot, Item
    from ray_jobs.results import RunStore

    cfg = load_config(EnrichConfig, ROOT / "configs" / "enrich-world.yaml", [f"store.path={work / 'store-1m'}"])
    use = StoreUse.of(cfg, "bench")
    rng = random.Random(3)
    digests = [f"{rng.getrandbits(128):032x}" for _ in range(keys)]
    from caslie_core.prompts import CAPTION_SLOT, fill_caption

    prompt, question = "Describe the product for category classification.", f"Is this caption useful? {CAPTION_SLOT}"
    caption = "a red ring"
    asked = fill_caption(question, caption)  # the question every stored caption's votes are looked up with
    now = time.time()
    t = time.perf_counter()
    for kind, model_keys in (
        ("captions", [(use.captioner, [result_key(use.captioner, d, prompt) for d in digests], caption)]),
        (
            "votes",
            [
                (m, [result_key(m, asked)] + [result_key(m, f"{asked} {i}") for i in range(1, keys)], "yes")
                for m in use.judges.values()
            ],
        ),
    ):
        folder = work / "store-1m" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for n, (model, ks, value) in enumerate(model_keys):
            table = pa.Table.from_pydict(
                {
                    "key": ks,
                    "value": [value] * keys,
                    "raw": [None] * keys,
                    "model": [model] * keys,
                    "run_id": ["seed"] * keys,
                    "created": [now] * keys,
                },
                schema=_schema(),
            )
            pq.write_table(table, folder / f"part-seed-{n}.parquet")
    written_s = time.perf_counter() - t
    t = time.perf_counter()
    run = RunStore(use, shards)
    run.lookup.get("captions", [f"{n:040x}" for n in range(shards * 64)])  # every shard asked once: loaded
    load_s = time.perf_counter() - t
    # batches of 128 records, 1.9 images each, half of them stored (their digests), their votes stored too
    batches, per_batch, timings = 40, 128, []
    for b in range(batches):
        items = []
        for r in range(per_batch):
            slots = []
            for k in range(2 if r % 10 else 1):
                stored = rng.random() < 0.5
                d = digests[rng.randrange(keys)] if stored else f"{rng.getrandbits(128):032x}"
                slots.append(ImageSlot(index=k, url=f"u{b}-{r}-{k}", prompt=prompt, question=question, digest=d))
            items.append(Item(id=f"{b}-{r}", task="CC", images=slots))
        t = time.perf_counter()
        look_up(items, use, run.lookup)
        timings.append(time.perf_counter() - t)
    records = batches * per_batch
    import ray

    figures = ray.get([a.stats.remote() for a in run.actors])
    loaded = {k: sum(f["keys"][k] for f in figures) for k in ("captions", "votes")}
    run.stop()
    return {
        "stored_keys": {"captions": keys, "votes": keys * len(use.judges)},
        "shards": shards,
        "store_write_seconds": round(written_s, 2),
        "load_seconds": round(load_s, 2),
        "loaded": loaded,
        "lookup_seconds_per_record": round(sum(timings) / records, 7),
        "lookup_seconds_per_batch_p50": round(sorted(timings)[len(timings) // 2], 5),
        "records_looked_up": records,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1050)
    p.add_argument("--changed", type=float, default=0.05)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--captioner-ms", type=float, default=0.0, help="model cost added per image (a VLM on a GPU)")
    p.add_argument("--judge-ms", type=float, default=0.0, help="model cost added per judge question")
    p.add_argument("--skip-scale", action="store_true", help="leave out the lookups at scale")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "incremental-cpu-2core.json"))
    args = p.parse_args(argv)

    import ray

    from caslie_core.world.catalog import write_world_catalog
    from caslie_core.world.models import ensure_world_models

    ensure_world_models()
    work = Path(tempfile.mkdtemp(prefix="caslie-bench-incremental-"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        catalog = write_world_catalog(work / "day1", args.records, seed=7)
        cfg = ROOT / "configs" / "enrich-world.yaml"
        ms = {"captioner": args.captioner_ms, "judge": args.judge_ms}
        cold = _run(cfg, catalog["jsonl"], work / "out-cold", work / "store", work / "logs-cold", ms)
        day2 = _next_day(catalog, work / "day2", args.changed)
        rerun = _run(cfg, day2["jsonl"], work / "out-rerun", work / "store", work / "logs-rerun", ms)
        scale = None if args.skip_scale else lookups_at_scale(args.keys, args.shards, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "incremental",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "catalog": {"records": catalog["records"], "images": catalog["images"]},
        "added_model_ms": {"captioner_per_image": args.captioner_ms, "judge_per_question": args.judge_ms},
        "next_day": {k: v for k, v in day2.items() if k != "jsonl"},
        "cold": cold,
        "rerun": rerun,
        "rerun_over_cold": {
            "model_seconds": round(rerun["model_seconds"] / cold["model_seconds"], 4),
            "wall_seconds": round(rerun["wall_seconds"] / cold["wall_seconds"], 4),
            "captioner_items": round(rerun["models"]["captioner"]["items"] / cold["models"]["captioner"]["items"], 4),
        },
        "targets": {"model_seconds": 0.1, "wall_seconds": 0.25},
        "lookups_at_scale": scale,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("next_day", "rerun_over_cold", "lookups_at_scale")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
