"""The enrichment pipeline as a whole: stage order, provenance, summary counts and the one-process loop.

`run_local` is the reference: the same stages the Ray job runs, in one process, batch by batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import CaslieError
from ..images import FetchPolicy
from ..io import store
from ..io.store import partition_value
from ..prompts import PROMPT_VERSION
from ..tasks import get_task
from .cache import CaptionCache, LocalCaptionCache
from .stages import CaptionStage, JudgeStage, decode_rows, fetch_rows, finalize_rows, parse_rows


class ErrorRateLimit:
    """`limits.max_failed_fraction`: stop a job whose records fail past the configured share (after
    `limits.min_records`), pointing at the `error` column; a rerun resumes."""

    def __init__(self, limits, *, where: str) -> None:
        self.limits, self.where, self.seen, self.failed = limits, where, 0, 0

    def see(self, statuses: list[str]) -> None:
        self.seen += len(statuses)
        self.failed += statuses.count("failed")
        lim, seen, failed = self.limits, self.seen, self.failed
        if seen >= lim.min_records and failed / seen > lim.max_failed_fraction:
            raise CaslieError(
                f"error-rate limit passed: {failed} of {seen} records failed "
                f"({failed / seen:.1%} > limits.max_failed_fraction={lim.max_failed_fraction}); "
                f"see the `error` column under {self.where}; rerun to resume"
            )


def provenance(cfg, config_hash: str, run_id: str) -> dict:
    return {
        "captioner_model": cfg.captioner.model,
        "captioner_revision": cfg.captioner.revision,
        "judges": json.dumps(
            [{"name": j.name, "model": j.model, "revision": j.revision, "mode": j.mode} for j in cfg.judges]
        ),
        "prompt_version": PROMPT_VERSION,
        "config_hash": config_hash,
        "run_id": run_id,
    }


def summarize(rows: Iterable[dict]) -> dict:
    """Counts over output rows: statuses, per-stage image errors, captions kept per task."""
    from collections import Counter

    status, stages, kept, images, per_task = Counter(), Counter(), Counter(), Counter(), Counter()
    n = 0
    for row in rows:
        n += 1
        status[row["status"]] += 1
        valid_task = partition_value(row["task"] or "") != "_invalid"
        task = get_task(row["task"]).abbr if valid_task else "_invalid"
        per_task[task] += 1
        if row["status"] == "failed":
            err = json.loads(row["error"]) if row.get("error") else {}
            stages[err.get("stage", "unknown")] += 1
            continue
        for res in json.loads(row["image_results"]):
            images[task] += 1
            kept[task] += bool(res["kept"])
            if res["error"]:
                stages[res["error"]["stage"]] += 1
    return {
        "records": n,
        "ok": status["ok"],
        "partial": status["partial"],
        "failed": status["failed"],
        "records_per_task": dict(per_task),
        "errors_per_stage": dict(stages),
        "images_per_task": dict(images),
        "captions_kept_per_task": dict(kept),
        "kept_share_per_task": {t: round(kept[t] / images[t], 4) for t in images if images[t]},
    }


def run_local(
    raw_rows: list[dict],
    *,
    policy: FetchPolicy,
    captioner,
    judges: dict[str, Any],
    size: int,
    max_pixels: int,
    provenance: dict,
    cache: CaptionCache | None = None,
    batch: int = 16,
    on_batch: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """The whole pipeline in one process (no Ray): the baseline for benchmarks and a reference."""
    out = []
    stage = CaptionStage(captioner, size, cache or LocalCaptionCache())
    judge_stages = [JudgeStage(j, name) for name, j in judges.items()]
    for start in range(0, len(raw_rows), batch):
        rows = parse_rows(raw_rows[start : start + batch])
        rows = decode_rows(fetch_rows(rows, policy), max_pixels=max_pixels, size=size)
        rows = stage(rows)
        for js in judge_stages:
            rows = js(rows)
        done = finalize_rows(rows, judge_names=list(judges), provenance=provenance)
        if on_batch:
            on_batch(done)
        out.extend(done)
    return out


def enrich_summary(
    cfg, *, wall: float, processed_now: int, resumed: int, cache_stats: dict, chash: str, run_id: str
) -> dict:
    """The `summary.json` of an enrichment run (counts over the whole output, resumed runs included)."""
    rows = store.read_output(cfg.output.path, ["id", "task", "status", "error", "image_results"])
    counts = summarize(rows)
    ids = [r["id"] for r in rows]
    images_now = counts["images_per_task"]
    total_images = sum(images_now.values())
    return {
        "job": "enrich",
        **counts,
        "records_out": len(rows),
        "duplicate_ids": len(ids) - len(set(ids)),
        "processed_this_run": processed_now,
        "skipped_already_done": resumed,
        "images": total_images,
        "images_per_second": round(total_images * (processed_now / max(1, len(rows))) / wall, 3) if wall else None,
        "wall_seconds": round(wall, 2),
        "caption_cache": cache_stats,
        "output": cfg.output.path,
        "records_path": store.parts_root(cfg.output.path),
        "run_id": run_id,
        "config_hash": chash,
        "config": cfg.model_dump(mode="json"),
    }
