"""`caslie enrich`: catalog enrichment on Ray Data: captions (EC3), judge votes (CQE), enriched records out.

    caslie enrich configs/enrich-demo.yaml --set input.path=records.jsonl --set output.path=/tmp/enriched
    python -m ray_jobs.enrich --config configs/enrich-demo.yaml [--set key=value ...]

Recipe: connect -> read -> validate -> fetch + decode -> captioner pool -> a pool per judge -> finalize +
write Parquet parts (`caslie_core.io.store`) -> summary. One row per record, so the graph streams with no
shuffle. Rerunning into the same output resumes: records already written are skipped.
"""

from __future__ import annotations

import json
import time
import uuid

import pyarrow as pa

from caslie_core.config import EnrichConfig, config_hash, write_resolved
from caslie_core.enrichment import pipeline, stages
from caslie_core.enrichment.cache import ClaimTable
from caslie_core.images import FetchPolicy
from caslie_core.io import store
from caslie_core.io.sources import raw_texts, reading_plan

from .actors import BestEffortActor, actor_id, best_effort_get, driver_actor
from .common import configure_data_context, init_ray, job_entry, job_main, log, to_table

S = pa.string()
RAW = {"text": S}
PARSED = {**dict.fromkeys(("id", "task", "split", "status", "error", "record", "raw"), S), "n_images": pa.int32()}
DECODED = {**PARSED, "image_errors": S, "image_digests": pa.list_(S), "pixels": pa.list_(pa.binary())}
CAPTIONED = {
    **{k: v for k, v in DECODED.items() if k != "pixels"},
    "captions": S,
    "caption_cached": pa.list_(pa.bool_()),
}
WRITTEN = dict.fromkeys(("id", "status", "task", "path"), S)


def read_raw(cfg: EnrichConfig):
    """Dataset of raw rows, each `{"text": <one record as JSON>}`, from every input file."""
    import ray.data

    parts = []
    for r in reading_plan(cfg.input.path, cfg.input.format):
        if r.reader == "text":
            ds = ray.data.read_text(r.path, filesystem=r.filesystem)
        elif r.reader == "parquet":
            ds = ray.data.read_parquet(r.path, filesystem=r.filesystem)
            ds = ds.map_batches(_parquet_to_text, batch_format="pyarrow")
        else:  # JSON lists, compressed files and http(s)/hf URLs stream through the driver
            ds = ray.data.from_items([{"text": text} for text in raw_texts(r.path)])
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.limit(cfg.input.limit) if cfg.input.limit else ds


def _parquet_to_text(batch: pa.Table) -> pa.Table:
    return to_table([{"text": json.dumps(r, default=str)} for r in batch.to_pylist()], RAW)


_DONE: dict[str, frozenset] = {}  # the finished ids of a resumed run, fetched once per worker process


def parse_batch(batch: pa.Table, done_ref=None) -> pa.Table:
    import ray

    rows = stages.parse_rows(batch.to_pylist())
    if done_ref is not None:
        if done_ref.hex() not in _DONE:
            _DONE.clear()
            _DONE[done_ref.hex()] = ray.get(done_ref)
        rows = [r for r in rows if r["id"] not in _DONE[done_ref.hex()]]
    return to_table(rows, PARSED)


def fetch_decode_batch(batch: pa.Table, policy: FetchPolicy, threads: int, max_pixels: int, size: int) -> pa.Table:
    rows = stages.fetch_rows(batch.to_pylist(), policy, threads=threads)
    rows = stages.decode_rows(rows, max_pixels=max_pixels, size=size)
    return to_table(rows, DECODED)


class _RayCache(BestEffortActor):
    """Client of the run-wide caption cache actor (the `CaptionCache` protocol), best effort: when the actor
    cannot be reached, claims come back "mine" (caption it here) and puts/releases are dropped, so a lost
    cache costs duplicate captions, never records."""

    def claim(self, keys, owner):
        return self.call("claim", keys, owner, fallback={k: ("mine", None) for k in keys})

    def put(self, items, owner):
        self.call("put", items, owner, fallback=None)

    def release(self, keys, owner):
        self.call("release", keys, owner, fallback=None)


class CaptionActor:
    def __init__(self, captioner: dict, size: int, cache: tuple[str, str] | None, wait_s: float) -> None:
        from caslie_core.config import CaptionerConfig
        from caslie_core.models.captioner import Captioner

        model = Captioner.from_config(CaptionerConfig.model_validate(captioner))
        cache_client = _RayCache(*cache) if cache else None
        self.stage = stages.CaptionStage(model, size, cache_client, owner=actor_id(), wait_s=wait_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.stage(batch.to_pylist()), CAPTIONED)


class JudgeActor:
    def __init__(self, judge: dict, columns: dict) -> None:
        from caslie_core.config import JudgeConfig
        from caslie_core.models.judge import Judge

        j = JudgeConfig.model_validate(judge)
        self.stage = stages.JudgeStage(Judge.from_config(j), j.name)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.stage(batch.to_pylist()), self.columns)


def write_batch(batch: pa.Table, output: str, judge_names: list[str], provenance: dict, partition: bool) -> pa.Table:
    rows = stages.finalize_rows(batch.to_pylist(), judge_names=judge_names, provenance=provenance)
    return to_table(store.write_parts(rows, output, partition=partition), WRITTEN)


def build_dataset(cfg: EnrichConfig, *, done_ref=None, cache: tuple[str, str] | None, chash: str, run_id: str):
    import ray.data

    policy = cfg.fetch.policy()
    size = cfg.decode.image_size
    ds = read_raw(cfg)
    ds = ds.map_batches(
        parse_batch, batch_format="pyarrow", batch_size=cfg.records_per_batch, fn_kwargs={"done_ref": done_ref}
    )
    ds = ds.map_batches(
        fetch_decode_batch,
        batch_format="pyarrow",
        batch_size=cfg.records_per_batch,
        fn_kwargs={"policy": policy, "threads": cfg.fetch.threads, "max_pixels": cfg.decode.max_pixels, "size": size},
    )
    cp = cfg.captioner.pool
    ds = ds.map_batches(
        CaptionActor,
        batch_format="pyarrow",
        batch_size=cp.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cp.min_size, max_size=cp.max_size),
        num_gpus=cp.num_gpus,
        num_cpus=cp.num_cpus,
        fn_constructor_kwargs=dict(
            captioner=cfg.captioner.model_dump(), size=size, cache=cache, wait_s=cfg.dedup.claim_ttl_s
        ),
    )
    columns = dict(CAPTIONED)
    for j in cfg.judges:
        columns = {**columns, f"votes_{j.name}": pa.string()}
        ds = ds.map_batches(
            JudgeActor,
            batch_format="pyarrow",
            batch_size=j.pool.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=j.pool.min_size, max_size=j.pool.max_size),
            num_gpus=j.pool.num_gpus,
            num_cpus=j.pool.num_cpus,
            fn_constructor_kwargs={"judge": j.model_dump(), "columns": dict(columns)},
        )
    prov = pipeline.provenance(cfg, chash, run_id)
    return ds.map_batches(
        write_batch,
        batch_format="pyarrow",
        batch_size=cfg.records_per_batch,
        fn_kwargs=dict(
            output=cfg.output.path,
            judge_names=[j.name for j in cfg.judges],
            provenance=prov,
            partition=cfg.output.partition_by_task,
        ),
    )


def run(cfg: EnrichConfig) -> dict:
    """Run the job; return the summary (also written to `output.path/summary.json`)."""
    import fsspec
    import ray

    started = init_ray(cfg.ray)
    t0 = time.time()
    try:
        configure_data_context(cfg.ray.progress_bars)
        fs, out_root = fsspec.core.url_to_fs(cfg.output.path)
        fs.makedirs(out_root, exist_ok=True)
        write_resolved(cfg, cfg.output.path)
        chash = config_hash(cfg)
        run_id = uuid.uuid4().hex[:12]
        previous = store.done_ids(cfg.output.path)
        done_ref = ray.put(previous) if previous else None
        cache = (f"caslie-caption-cache-{run_id}", "caslie") if cfg.dedup.enabled else None
        # On the driver's node (it lives as long as the job does); restarted empty if that fails anyway.
        cache_actor = driver_actor(ClaimTable, *cache, cfg.dedup.claim_ttl_s, cfg.dedup.max_entries) if cache else None
        ds = build_dataset(cfg, done_ref=done_ref, cache=cache, chash=chash, run_id=run_id)
        limit = pipeline.ErrorRateLimit(cfg.limits, where=store.parts_root(cfg.output.path))
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                limit.see(batch.column("status").to_pylist())
            cache_stats = best_effort_get(cache_actor.stats.remote(), fallback=None) if cache_actor else {}
        finally:
            if cache_actor:
                ray.kill(cache_actor)
        removed = store.drop_duplicates(cfg.output.path)
        wall = time.time() - t0
        summary = pipeline.enrich_summary(
            cfg,
            wall=wall,
            processed_now=limit.seen,
            resumed=len(previous),
            cache_stats=cache_stats,
            chash=chash,
            run_id=run_id,
        )
        summary["duplicates_removed"] = removed
        with fsspec.open(cfg.output.path.rstrip("/") + "/summary.json", "wt") as fh:
            json.dump(summary, fh, indent=2)
        log.info(
            f"[enrich] {summary['records']} records: {summary['ok']} ok, {summary['partial']} partial, "
            f"{summary['failed']} failed; {summary['images_per_second']} images/s; "
            f"output {cfg.output.path}"
        )
        return summary
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return job_main("enrich", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("enrich"))
