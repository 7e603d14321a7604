"""`caslie demo`: every stage that exists, on the embedded default, with a summary of where things are."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(workdir: str, *, records: int = 140, seed: int = 0) -> dict:
    from caslie_core.synthetic import write_catalog
    from caslie_core.tiny_models import ensure_tiny_models

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"workdir": str(work), "stages": {}}

    t = time.time()
    models = ensure_tiny_models()
    summary["stages"]["tiny_models"] = {"paths": models, "seconds": round(time.time() - t, 2)}
    print(f"[demo] tiny models ready: {models['captioner']}, {models['lm']}")

    t = time.time()
    manifest = write_catalog(work / "catalog", records, seed=seed, broken_images=max(3, records // 40))
    summary["stages"]["catalog"] = {
        "output": str(work / "catalog"),
        "records": manifest["records"],
        "images": manifest["images"],
        "broken_images": len(manifest["broken_images"]),
        "splits": manifest["splits"],
        "seconds": round(time.time() - t, 2),
    }
    print(f"[demo] synthetic catalog: {manifest['records']} records, {manifest['images']} images "
          f"({len(manifest['broken_images'])} broken on purpose) in {work / 'catalog'}")

    t = time.time()
    summary["stages"]["enrich"] = _enrich(work)
    summary["stages"]["enrich"]["seconds"] = round(time.time() - t, 2)

    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] summary: {work / 'summary.json'}")
    return summary


def _enrich(work: Path) -> dict:
    from caslie_core.config import load_config
    from caslie_core.jobconfigs import EnrichConfig
    from ray_jobs import enrich
    from ray_jobs.common import ROOT

    cfg = load_config(EnrichConfig, ROOT / "configs" / "enrich-demo.yaml", [
        f"input.path={work / 'catalog' / 'records.jsonl'}", f"output.path={work / 'enriched'}",
    ])
    s = enrich.run(cfg)
    return {
        "output": s["records_path"],
        "records": s["records"], "ok": s["ok"], "partial": s["partial"], "failed": s["failed"],
        "kept_share_per_task": s["kept_share_per_task"], "errors_per_stage": s["errors_per_stage"],
    }
