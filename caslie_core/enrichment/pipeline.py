"""The enrichment pipeline as a whole: provenance, counts, progress, the error-rate limit, the one-process loop.

Counts (`tally`) are made where rows are written, one small dict per part, and summed by whoever
follows the job: the driver never reads the output back. `run_local` is the reference: the same
stages the Ray job runs, in one process, batch by batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..errors import CaslieError
from ..images import FetchPolicy
from ..io import ledger, store
from ..io.ledger import add_counts
from ..io.store import partition_value
from ..prompts import PROMPT_VERSION
from ..records import json_or_text
from ..tasks import get_task
from .cache import CaptionCache, LocalCaptionCache
from .stages import CaptionStage, JudgeStage, finalize, prepare
from .stored import Lookup, ResultWriter, StoreUse

# the output columns `tally` reads (to recount a part written without stored counts)
TALLY_COLUMNS = ("task", "status", "error", "image_results")


class ErrorRateLimit:
    """`limits.max_failed_fraction`: stop a job whose records fail past the configured share (after
    `limits.min_records`), pointing at the `error` column; a rerun resumes."""

    def __init__(self, limits, *, where: str) -> None:
        self.limits, self.where, self.seen, self.failed = limits, where, 0, 0

    def see(self, records: int, failed: int) -> None:
        self.seen += records
        self.failed += failed
        lim, seen, failed = self.limits, self.seen, self.failed
        if seen >= lim.min_records and failed / seen > lim.max_failed_fraction:
            raise CaslieError(
                f"error-rate limit passed: {failed} of {seen} records failed "
                f"({failed / seen:.1%} > limits.max_failed_fraction={lim.max_failed_fraction}); "
                f"see the `error` column under {self.where}; rerun to resume"
            )


BLOCKS_PER_ACTOR = 4
MAX_BLOCK_RECORDS = 10_000


def read_blocks(rows: int | None, records_per_batch: int, widest_pool: int) -> int | None:
    """How many blocks to read a JSON-lines file of about `rows` records in: a block goes to one actor whole, so a
    pool of `widest_pool` actors needs `BLOCKS_PER_ACTOR` per actor to keep each busy (a one-file catalog came in
    ~6 blocks, and an autoscaled second actor found nothing to do); blocks stay between `records_per_batch` and
    `MAX_BLOCK_RECORDS` records, since every block costs a task per pool (blocks of 128 records made the 2-core
    plane 30% slower than Ray Data's own ~3,000). None (Ray Data's own choice) for one-actor pools."""
    if not rows or widest_pool <= 1:
        return None
    wanted = max(BLOCKS_PER_ACTOR * widest_pool, -(-rows // MAX_BLOCK_RECORDS))
    return max(1, min(-(-rows // records_per_batch), wanted))


def engine_of(section, found: dict | None) -> dict:
    """Where a model ran, for the provenance: `hf`, or `openai` with the server's hosts, the model id asked for and
    the one the server reported (`found`: what `models.remote.preflight` saw)."""
    if getattr(section, "engine", "hf") != "openai":
        return {"engine": "hf"}
    found = found or {}
    model = section.openai.model or section.model
    return {"engine": "openai", "hosts": found.get("hosts"), "model": model, "served_model": found.get("served_model")}


def check_engines(cfg, say) -> dict:
    """Each `engine: openai` captioner or judge of the job checked once, before any actor starts
    (`models.remote.check_engines`); what the provenance records, by `captioner` or judge name."""
    from ..models.remote import check_engines

    return check_engines(cfg.captioner if cfg.captioner.source == "model" else None, cfg.judges, say)


def provenance(cfg, config_hash: str, run_id: str, engines: dict | None = None) -> dict:
    """What each output row records of how it was made; `engines`: `preflight` results by `captioner` or a judge's
    name (the OpenAI-compatible servers checked at the start)."""
    engines = engines or {}
    judges = [
        {"name": j.name, "model": j.model, "revision": j.revision, "mode": j.mode, **engine_of(j, engines.get(j.name))}
        for j in cfg.judges
    ]
    return {
        "captioner_model": cfg.captioner.model,
        "captioner_revision": cfg.captioner.revision,
        "captioner_engine": json.dumps(engine_of(cfg.captioner, engines.get("captioner"))),
        "judges": json.dumps(judges),
        "prompt_version": PROMPT_VERSION,
        "caption_source": cfg.captioner.source,
        "cqe_vote": cfg.cqe.vote,  # how finalize decides what is kept
        "config_hash": config_hash,
        "run_id": run_id,
    }


def _task_abbr(task: str | None) -> str:
    return get_task(task).abbr if partition_value(task or "") != "_invalid" else "_invalid"


def tally(rows) -> dict:
    """Counts over output rows: statuses, records per task, errors per stage (a failed record's, each failed
    image's), images and kept captions per task. Sums of tallies are tallies (`add_counts`)."""
    t: dict[str, Any] = {"records": 0, "ok": 0, "partial": 0, "failed": 0, "images": 0, "kept": 0}
    t.update(stored_captions=0, stored_votes=0)  # what the result store gave (`stored_from`)
    per_task: dict[str, int] = {}
    stages: dict[str, int] = {}
    images: dict[str, int] = {}
    kept: dict[str, int] = {}
    for row in rows:
        t["records"] += 1
        t[row["status"]] = t.get(row["status"], 0) + 1
        task = _task_abbr(row["task"])
        per_task[task] = per_task.get(task, 0) + 1
        if row["status"] == "failed":
            stage = (json_or_text(row.get("error")) or {}).get("stage", "unknown")
            stages[stage] = stages.get(stage, 0) + 1
            continue
        for res in json_or_text(row.get("image_results")) or []:
            images[task] = images.get(task, 0) + 1
            kept[task] = kept.get(task, 0) + bool(res["kept"])
            t["stored_captions"] += res.get("stored_from") is not None
            t["stored_votes"] += sum(v.get("stored_from") is not None for v in res.get("votes") or [])
            if res["error"]:
                stages[res["error"]["stage"]] = stages.get(res["error"]["stage"], 0) + 1
    t["images"], t["kept"] = sum(images.values()), sum(kept.values())
    t.update(records_per_task=per_task, errors_per_stage=stages, images_per_task=images, captions_kept_per_task=kept)
    return t


def tally_table(table) -> dict:
    return tally(table.select([c for c in TALLY_COLUMNS if c in table.column_names]).to_pylist())


def summarize(rows) -> dict:
    """`tally` in the summary's shape (with the kept share per task)."""
    return summary_counts(tally(rows))


def summary_counts(t: dict) -> dict:
    images, kept = t.get("images_per_task", {}), t.get("captions_kept_per_task", {})
    return {
        "records": t.get("records", 0),
        "ok": t.get("ok", 0),
        "partial": t.get("partial", 0),
        "failed": t.get("failed", 0),
        "records_per_task": t.get("records_per_task", {}),
        "errors_per_stage": t.get("errors_per_stage", {}),
        "images_per_task": images,
        "captions_kept_per_task": kept,
        "kept_share": {k: round(kept.get(k, 0) / n, 4) for k, n in images.items() if n},
    }


def write(table, *, output: str, provenance: dict, partition: bool) -> dict:
    """Finalize an Arrow batch of items and write it as parts; return its counts (parts keep theirs too)."""
    counts: dict = {}
    for part in store.write_parts(finalize(table, provenance=provenance), output, partition=partition, tally=tally):
        counts = add_counts(counts, part)
    return counts


def scan_output(output: str):
    """(the finished ids of an output as sorted digests, {"counts", "records", "duplicates", "damaged",
    "temporaries"} of what it holds): damaged parts moved to quarantine/ (their records are redone), killed writers'
    temporary parts removed."""
    temporaries = ledger.sweep_temporaries(output)
    damaged: list = []
    digests, counts, n = ledger.scan(output, recount=tally_table, columns=TALLY_COLUMNS, damaged=damaged)
    meta = {"counts": counts, "records": n, "duplicates": n - len(digests)}
    return digests, {**meta, "damaged": damaged, "temporaries": temporaries}


def dedupe_output(output: str) -> tuple[int, dict, list[str]]:
    """(rows removed as duplicates, their counts, the ids the input repeated: of each, its first copy is kept)."""
    repeated: list[str] = []
    removed, counts = ledger.drop_duplicates(output, recount=tally_table, repeated=repeated)
    return removed, counts, repeated


def repeats(ids: list[str], shown: int = 20) -> dict:
    """The summary's `repeated_ids`: how many ids the input repeated, the rule, the first of them."""
    return {"count": len(ids), "kept": "the first copy in input order", "ids": ids[:shown]}


def repeats_line(r: dict) -> str:
    more = f" and {r['count'] - len(r['ids'])} more" if r["count"] > len(r["ids"]) else ""
    return f"{r['count']} ids repeated in the input, the first copy of each kept: {', '.join(r['ids'])}{more}"


def last_line(summary: dict, output: str) -> str:
    """The job's last line: statuses, speed, where the output (and report) is, repeated ids."""
    line = (
        f"{summary['records']} records: {summary['ok']} ok, {summary['partial']} partial, {summary['failed']} failed; "
        f"{summary['images_per_second']} images/s; output {output}"
    )
    if "report" in summary:
        line += f"; report {summary['report']}"
    if summary.get("repeated_ids", {}).get("count"):
        line += f"; {repeats_line(summary['repeated_ids'])}"
    return line


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line every `interval` seconds: records done (of the total when known), statuses, images/s,
    captions kept, ETA. For logs that are not a terminal (`ray job logs -f`, CI, KubeRay)."""

    def __init__(self, interval: float, *, total: int | None, say: Callable[[str], None], clock=time.monotonic):
        self.interval, self.total, self.say, self.clock = interval, total, say, clock
        self.start = self.last = clock()
        self.counts: dict = {}

    def add(self, counts: dict) -> None:
        self.counts = add_counts(self.counts, counts)
        if self.interval and self.clock() - self.last >= self.interval:
            self.say(self.line())

    def line(self) -> str:
        self.last = now = self.clock()
        c, elapsed = self.counts, max(1e-9, now - self.start)
        done = c.get("records", 0)
        head = f"{done:,} records"
        eta = ""
        if self.total:
            head = f"{done:,} / {self.total:,} records ({done / self.total:.0%})"
            if done:
                eta = f"; ETA {_duration((self.total - done) * elapsed / done)}"
        return (
            f"[enrich] {head}: {c.get('ok', 0):,} ok, {c.get('partial', 0):,} partial, {c.get('failed', 0):,} "
            f"failed; {c.get('images', 0) / elapsed:.1f} images/s; {c.get('kept', 0):,} captions kept; "
            f"{_duration(elapsed)} elapsed{eta}"
        )


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
    threads: int = 16,
    on_batch: Callable[[list[dict]], None] | None = None,
    store: StoreUse | None = None,
    lookup: Lookup | None = None,
    research: bool = False,
) -> list[dict]:
    """The whole pipeline in one process (no Ray): the baseline for benchmarks and a reference. With `store`
    (and `lookup` when it reads), as the job uses the result store; `research`: the judges judge every image,
    a missing caption as "NA" (`cqe.vote: research`)."""
    out = []
    writer = ResultWriter(store) if store is not None and store.writes else None
    stage = CaptionStage(captioner, size, cache or LocalCaptionCache(), results=writer)
    judge_stages = [JudgeStage(j, name, judge_missing=research, results=writer) for name, j in judges.items()]
    for start in range(0, len(raw_rows), batch):
        rows = raw_rows[start : start + batch]
        table = prepare(
            rows, policy=policy, threads=threads, max_pixels=max_pixels, size=size, store=store, lookup=lookup
        )
        table = stage(table)
        for js in judge_stages:
            table = js(table)
        done = finalize(table, provenance=provenance)
        if on_batch:
            on_batch(done)
        out.extend(done)
    return out


def enrich_summary(
    cfg,
    counts: dict,
    *,
    wall: float,
    dataset_seconds: float,
    processed_now: int,
    images_now: int,
    resumed: int,
    duplicates_removed: int,
    cache_stats: dict,
    chash: str,
    run_id: str,
) -> dict:
    """The `summary.json` of an enrichment run: `counts` over the whole output (resumed runs included)."""
    return {
        "job": "enrich",
        **summary_counts(counts),
        "records_out": counts.get("records", 0),
        "processed_this_run": processed_now,
        "skipped_already_done": resumed,
        "duplicates_removed": duplicates_removed,
        "images": counts.get("images", 0),
        "images_this_run": images_now,
        "images_per_second": round(images_now / dataset_seconds, 3) if dataset_seconds else None,
        "records_per_second": round(processed_now / dataset_seconds, 3) if dataset_seconds else None,
        "wall_seconds": round(wall, 2),
        "dataset_seconds": round(dataset_seconds, 2),
        "tail_seconds": round(wall - dataset_seconds, 2),
        "caption_cache": cache_stats,
        "output": cfg.output.path,
        "records_path": store.parts_root(cfg.output.path),
        "run_id": run_id,
        "config_hash": chash,
        "config": cfg.model_dump(mode="json"),
    }
