"""`caslie enrich`: catalog enrichment on Ray Data: captions (EC3), judge votes (CQE), enriched records out.

    caslie enrich configs/enrich-demo.yaml --set input.path=records.jsonl --set output.path=/tmp/enriched
    python -m ray_jobs.enrich --config configs/enrich-demo.yaml [--set key=value ...]

Recipe: connect -> scan the output (finished ids, counts) -> read -> validate + skip finished + fetch + decode
-> captioner pool -> a pool per judge -> finalize + write Parquet parts, each returning its counts -> drop
duplicates -> summary. Records travel as typed Arrow items (`caslie_core.items`), one row per record, so the
graph streams with no shuffle; the driver sums counts, never ids or rows. A rerun into the same output resumes.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from caslie_core.config import EnrichConfig, config_hash, write_resolved
from caslie_core.enrichment import pipeline
from caslie_core.enrichment import report as enrich_report
from caslie_core.enrichment.stored import StoreUse
from caslie_core.errors import CaslieError, EngineError, OutputError, SourceError, find_error
from caslie_core.io import ledger, store
from caslie_core.io.lock import OutputLock

from . import counters
from .capacity import pool_requests, wait_for_pools
from .common import configure_data_context, init_ray, job_entry, job_main, log, shutdown
from .enrich_actors import CaptionActor, JudgeActor, ModelsActor
from .enrich_tasks import prepare_batch, write_batch
from .results import RunStore
from .timeline import JobTimeline


def build_dataset(
    cfg: EnrichConfig, *, done_ref=None, cache, provenance: dict, factories=None, timeline=None, store=None, lookup=None
):
    """The job's dataset. `factories` ({"captioner" or a judge's name: a callable that returns the model}) lets
    tests and embedders hand the pools their own models (anything with the `CaptionModel`/`VoteModel` calls);
    `timeline` (a `JobTimeline.actor_ref`): the model actors report their batches there; `store` (a `StoreUse`)
    and `lookup`: the result store's use and its lookup actors' client (`ray_jobs.results`)."""
    import ray.data

    from .reading import read_raw  # imports Ray Data

    factories, lazy = factories or {}, done_ref is not None  # a resumed run loads its models when rows come
    size = cfg.decode.image_size
    ds = read_raw(cfg).map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=cfg.records_per_batch,
        num_cpus=cfg.task_num_cpus,
        fn_kwargs=dict(
            policy=cfg.fetch.policy(),
            threads=cfg.fetch.threads,
            max_pixels=cfg.decode.max_pixels,
            size=size,
            done_ref=done_ref,
            captions_from_record=cfg.captioner.source == "record",
            store=store,
            lookup=lookup,
        ),
    )
    cp, captioning = cfg.captioner.pool, cfg.captioner.source == "model"
    caption = dict(captioner=cfg.captioner.model_dump(), size=size, cache=cache, wait_s=cfg.dedup.claim_ttl_s)
    caption["store"] = store
    pools = []  # (actor class, pool, constructor kwargs), keyed as in the config (the timeline's names)
    first = (captioning,)  # the first pool counts what reached it too (validation, fetch/decode when fetched)
    if cfg.model_pools == "shared":
        kw = dict(caption=caption if captioning else None, judges=[j.model_dump() for j in cfg.judges])
        kw.update(factories=factories, store=store)
        pools.append((ModelsActor, cp, dict(kw, timeline=timeline and (timeline, "captioner.pool", first))))
    else:
        if captioning:
            kw = dict(caption, factory=factories.get("captioner"))
            pools.append((CaptionActor, cp, dict(kw, timeline=timeline and (timeline, "captioner.pool", first))))
        for i, j in enumerate(cfg.judges):
            ref = timeline and (timeline, f"judges.{i}.pool", *([] if pools else [first]))
            kw = dict(judge=j.model_dump(), factory=factories.get(j.name), store=store, timeline=ref)
            pools.append((JudgeActor, j.pool, kw))
    for actor, pool, kwargs in pools:
        ds = ds.map_batches(
            actor,
            batch_format="pyarrow",
            batch_size=pool.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
            num_gpus=pool.num_gpus,
            num_cpus=pool.num_cpus,
            fn_constructor_kwargs=dict(kwargs, lazy=lazy),
        )
    return ds.map_batches(
        write_batch,
        batch_format="pyarrow",
        batch_size=cfg.output.rows_per_part,
        num_cpus=cfg.task_num_cpus,
        fn_kwargs=dict(
            output=cfg.output.path,
            provenance=provenance,
            partition=cfg.output.partition_by_task,
        ),
    )


def stopped(what: str, progress: pipeline.Progress, resumed: int, out: str) -> str:
    """The one line a job stopped midway ends with: what happened, what is safely written, what to do."""
    done = progress.counts.get("records", 0)
    before = f" (besides {resumed:,} from earlier runs)" if resumed else ""
    return f"{what}; {done:,} records of this run are written in {out}{before}; rerun the same command to resume"


def run(cfg: EnrichConfig, *, factories: dict | None = None) -> dict:
    """Run the job; return the summary (also written to `output.path/summary.json`)."""
    import fsspec
    import ray

    out = cfg.output.path
    fs, out_root = fsspec.core.url_to_fs(out)
    fs.makedirs(out_root, exist_ok=True)  # an output that cannot be written fails here, before Ray starts
    run_id = uuid.uuid4().hex[:12]
    lock = OutputLock(out, run_id, say=log.warning).acquire()  # one run at a time into one output
    started, scaling, results = False, None, None
    try:
        started = init_ray(cfg.ray)
        t0 = time.time()  # the job's own time: from a connected Ray (its start-up is not the job's)
        configure_data_context(cfg.ray.progress_bars, cfg.progress_stall_s)
        written = counters.Counts(counters.written_series())  # at zero from the start: a first part is seen to rise
        write_resolved(cfg, cfg.output.path)
        chash = config_hash(cfg)  # the scan runs as a task, next to the data: the driver holds counts, never ids
        done_ref, meta_ref = ray.remote(num_cpus=0, num_returns=2)(pipeline.scan_output).remote(out)
        earlier = ray.get(meta_ref)
        for part, moved, why in earlier["damaged"]:
            log.warning(f"[enrich] output part {part} is unreadable ({why}): moved to {moved}; its records are redone")
        if earlier["temporaries"]:
            log.info(f"[enrich] removed {earlier['temporaries']} temporary part(s) left by writers of a killed run")
        resumed = earlier["records"] - earlier["duplicates"]
        # One helper actor on the driver's node for the job: the actors' batch reports, metrics and claims (dedup).
        claims = (cfg.dedup.claim_ttl_s, cfg.dedup.max_entries) if cfg.dedup.enabled else None
        scaling = JobTimeline(run_id, claims=claims, judges=[j.name for j in cfg.judges])
        cache = scaling.actor_ref if claims else None
        capacity_wait = wait_for_pools(pool_requests(cfg), can_grow=not started)
        prov = pipeline.provenance(cfg, chash, run_id, pipeline.check_engines(cfg, log.warning))  # servers answer
        done, use = done_ref if resumed else None, StoreUse.of(cfg, run_id)
        results = RunStore(use, cfg.store.shards) if use else None  # loaded before the plane starts
        ds = build_dataset(
            cfg,
            done_ref=done,
            cache=cache,
            provenance=prov,
            factories=factories,
            timeline=scaling.actor_ref,
            store=use,
            lookup=results and results.lookup,
        )
        limit = pipeline.ErrorRateLimit(cfg.limits, where=store.parts_root(cfg.output.path))
        interval = 0 if sys.stdout.isatty() else cfg.progress_interval_s  # a terminal has Ray Data's bars
        progress = pipeline.Progress(interval, total=cfg.input.limit, say=log.info)
        if resumed:
            log.info(f"[enrich] resuming: {resumed:,} records already in {cfg.output.path} are skipped")
        last_record = None
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                last_record = time.time()
                for text in batch.column("counts").to_pylist():
                    counts = json.loads(text)
                    progress.add(counts)
                    counters.enrich_counts(counts, into=written)
                    limit.see(counts.get("records", 0), counts.get("failed", 0))
        except KeyboardInterrupt as e:
            raise CaslieError(
                stopped(f"interrupted by {e.args[0] if e.args else 'SIGINT'}", progress, resumed, out)
            ) from None
        except Exception as e:
            if (engine := find_error(e, EngineError)) is not None:
                raise CaslieError(stopped(f"enrichment stopped: {engine}", progress, resumed, out)) from None
            if (io := find_error(e, OutputError)) is not None:  # disk full, permission denied: where parts go
                raise CaslieError(stopped(f"cannot write the output ({io})", progress, resumed, out)) from None
            if (bad := find_error(e, SourceError)) is not None:  # an input file that cannot be read at all
                raise CaslieError(stopped(f"cannot read the input: {bad}", progress, resumed, out)) from None
            raise
        finally:
            cache_stats = scaling.claim_stats() if claims else {}
            timeline = scaling.finish(t0, last_record=last_record)
            written.flush()
        dataset_seconds = time.time() - t0
        now = progress.counts
        # Duplicates come from this run's writes (a repeated id, a killed run's late writes) or an earlier run.
        removed, removed_counts, repeated = 0, {}, []
        if now.get("records") or earlier["duplicates"]:
            removed, removed_counts, repeated = ray.get(ray.remote(num_cpus=0)(pipeline.dedupe_output).remote(out))
        total = ledger.add_counts(ledger.add_counts(earlier["counts"], now), removed_counts, -1)
        summary = pipeline.enrich_summary(
            cfg,
            total,
            wall=time.time() - t0,
            dataset_seconds=dataset_seconds,
            processed_now=now.get("records", 0),
            images_now=now.get("images", 0),
            resumed=resumed,
            duplicates_removed=removed,
            cache_stats=cache_stats,
            chash=chash,
            run_id=run_id,
        )
        summary["repeated_ids"] = pipeline.repeats(repeated)  # ids the input repeated: their first copy kept
        summary["quarantined"] = [{"part": p, "moved_to": m, "why": w} for p, m, w in earlier["damaged"]]
        summary["capacity_wait_s"] = capacity_wait  # per pool: how long the cluster took to offer a first actor
        summary["batch_fallbacks"] = timeline.pop("batch_fallbacks", {})  # per model: batches redone item by item
        summary["timeline"] = timeline  # nodes added/removed during the job, each pool's actors at work
        summary["store"] = results.finish(now) if results else None  # what the result store gave and holds
        enrich_report.attach_report(cfg, summary, warn=log.warning)  # never fails the job
        with fsspec.open(cfg.output.path.rstrip("/") + "/summary.json", "wt") as fh:
            json.dump(summary, fh, indent=2)
        log.info(f"[enrich] {pipeline.last_line(summary, cfg.output.path)}")
        if repeated and cfg.input.on_duplicate_id == "error":
            raise CaslieError(f"input.on_duplicate_id=error: {pipeline.repeats_line(summary['repeated_ids'])}")
        return summary
    finally:
        if results:
            results.stop()
        if scaling:
            scaling.stop()  # a job that failed before its pipeline ended: no sampler or helper actor left
        lock.release()
        if started:
            shutdown(started)


def main(argv: list[str] | None = None) -> int:
    return job_main("enrich", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("enrich"))
