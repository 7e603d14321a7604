"""`caslie enrich`: catalog enrichment on Ray Data: captions (EC3), judge votes (CQE), enriched records out.

    caslie enrich configs/enrich-demo.yaml --set input.path=records.jsonl --set output.path=/tmp/enriched
    python -m ray_jobs.enrich --config configs/enrich-demo.yaml [--set key=value ...]

Recipe: parse config -> connect -> read records -> validate -> fetch -> decode -> captioner pool ->
one pool per judge -> finalize + write Parquet parts -> summary. Rows are one per record, so the
graph streams end to end with no shuffle. Rerunning into the same output resumes: records already
written are skipped (parts are written atomically, keyed by record id).
"""

from __future__ import annotations

import json
import time
import uuid

import pyarrow as pa

from caslie_core.config import EnrichConfig, config_hash, write_resolved
from caslie_core.enrichment import pipeline, stages
from caslie_core.enrichment.cache import ClaimTable
from caslie_core.errors import CaslieError
from caslie_core.images import FetchPolicy
from caslie_core.io import store
from caslie_core.io.sources import detect_format, find_record_files, iter_raw_rows

from .common import configure_data_context, init_ray, job_entry, job_main, log, to_table

RAW = {"text": pa.string()}
PARSED = {
    "id": pa.string(),
    "task": pa.string(),
    "split": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "record": pa.string(),
    "raw": pa.string(),
    "n_images": pa.int32(),
}
DECODED = {
    **PARSED,
    "image_errors": pa.string(),
    "image_digests": pa.list_(pa.string()),
    "pixels": pa.list_(pa.binary()),
}
CAPTIONED = {
    **{k: v for k, v in DECODED.items() if k != "pixels"},
    "captions": pa.string(),
    "caption_cached": pa.list_(pa.bool_()),
}
WRITTEN = {"id": pa.string(), "status": pa.string(), "task": pa.string(), "path": pa.string()}


def read_raw(cfg: EnrichConfig):
    """Dataset of raw rows, each `{"text": <one record as JSON>}`, from every input file."""
    import fsspec
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = []
    for p in [cfg.input.path] if isinstance(cfg.input.path, str) else cfg.input.path:
        paths.extend(find_record_files(p))
    parts = []
    for path in paths:
        fmt = detect_format(path) if cfg.input.format == "auto" else cfg.input.format
        scheme = path.split("://", 1)[0] if "://" in path else "file"
        if (
            scheme in ("file", "s3", "gs", "gcs", "az", "abfs")
            and fmt in ("jsonl", "parquet")
            and not path.endswith(".gz")
        ):
            fs, stripped = fsspec.core.url_to_fs(path)
            pafs = None if scheme == "file" else PyFileSystem(FSSpecHandler(fs))
            if not fs.exists(stripped):
                raise CaslieError(f"input.path {path}: no such file")
            if fmt == "jsonl":
                ds = ray.data.read_text(stripped if pafs else path, filesystem=pafs)
            else:
                ds = ray.data.read_parquet(stripped if pafs else path, filesystem=pafs).map_batches(
                    _parquet_to_text, batch_format="pyarrow"
                )
        else:
            # JSON lists, compressed files and http(s)/hf URLs stream through the driver.
            rows = [
                {"text": raw.raw_text if isinstance(raw, Exception) else json.dumps(raw, default=str)}
                for _, raw in iter_raw_rows(path)
            ]
            ds = ray.data.from_items(rows)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.limit(cfg.input.limit) if cfg.input.limit else ds


def _parquet_to_text(batch: pa.Table) -> pa.Table:
    return to_table([{"text": json.dumps(r, default=str)} for r in batch.to_pylist()], RAW)


_DONE_CACHE: dict[str, frozenset] = {}


def parse_batch(batch: pa.Table, done_ref=None) -> pa.Table:
    import ray

    rows = stages.parse_rows(batch.to_pylist())
    if done_ref is not None:
        key = done_ref.hex()
        if key not in _DONE_CACHE:
            _DONE_CACHE.clear()
            _DONE_CACHE[key] = ray.get(done_ref)
        done = _DONE_CACHE[key]
        rows = [r for r in rows if r["id"] not in done]
    return to_table(rows, PARSED)


def fetch_decode_batch(batch: pa.Table, policy: FetchPolicy, threads: int, max_pixels: int, size: int) -> pa.Table:
    rows = stages.fetch_rows(batch.to_pylist(), policy, threads=threads)
    rows = stages.decode_rows(rows, max_pixels=max_pixels, size=size)
    return to_table(rows, DECODED)


def _actor_id() -> str:
    import ray

    return ray.get_runtime_context().get_actor_id() or f"pid-{__import__('os').getpid()}"


def _unreachable() -> tuple[type[Exception], ...]:
    """What a call to an actor raises when the actor (or its node) is gone or not answering."""
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError)


class _RayCache:
    """Client of the run-wide caption cache actor (the `CaptionCache` protocol), best effort.

    The cache only saves work: when the actor cannot be reached (its node died and it is restarting, or it
    is gone), claims come back "mine" (caption it here) and puts/releases are dropped, so a lost cache costs
    duplicate captions, never records.
    """

    TIMEOUT_S = 60.0

    def __init__(self, name: str, namespace: str) -> None:
        import ray

        self.actor = ray.get_actor(name, namespace=namespace)
        self._ray = ray
        self.unavailable = 0

    def _get(self, ref, fallback):
        try:
            return self._ray.get(ref, timeout=self.TIMEOUT_S)
        except _unreachable() as e:
            self.unavailable += 1
            if self.unavailable == 1:
                print(
                    f"[enrich] caption cache unavailable ({type(e).__name__}); captioning without it until it is back"
                )
            return fallback

    def claim(self, keys, owner):
        return self._get(self.actor.claim.remote(keys, owner), {k: ("mine", None) for k in keys})

    def put(self, items, owner):
        self._get(self.actor.put.remote(items, owner), None)

    def release(self, keys, owner):
        self._get(self.actor.release.remote(keys, owner), None)


class CaptionActor:
    def __init__(self, captioner: dict, size: int, cache: tuple[str, str] | None, wait_s: float) -> None:
        from caslie_core.config import CaptionerConfig
        from caslie_core.models.captioner import Captioner

        model = Captioner.from_config(CaptionerConfig.model_validate(captioner))
        cache_client = _RayCache(*cache) if cache else None
        self.stage = stages.CaptionStage(model, size, cache_client, owner=_actor_id(), wait_s=wait_s)

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
        fn_constructor_kwargs={
            "captioner": cfg.captioner.model_dump(),
            "size": size,
            "cache": cache,
            "wait_s": cfg.dedup.claim_ttl_s,
        },
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
        fn_kwargs={
            "output": cfg.output.path,
            "judge_names": [j.name for j in cfg.judges],
            "provenance": prov,
            "partition": cfg.output.partition_by_task,
        },
    )


def run(cfg: EnrichConfig) -> dict:
    """Run the job; return the summary (also written to `output.path/summary.json`)."""
    import fsspec
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
        cache_actor, cache = None, None
        if cfg.dedup.enabled:
            name, ns = f"caslie-caption-cache-{run_id}", "caslie"
            # On the driver's node (it lives as long as the job does); restarted empty if that fails anyway.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            cache_actor = (
                ray.remote(num_cpus=0)(ClaimTable)
                .options(name=name, namespace=ns, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1)
                .remote(cfg.dedup.claim_ttl_s, cfg.dedup.max_entries)
            )
            cache = (name, ns)
        ds = build_dataset(cfg, done_ref=done_ref, cache=cache, chash=chash, run_id=run_id)
        seen = failed = 0
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                statuses = batch.column("status").to_pylist()
                seen += len(statuses)
                failed += statuses.count("failed")
                lim = cfg.limits
                if seen >= lim.min_records and failed / seen > lim.max_failed_fraction:
                    raise CaslieError(
                        f"error-rate limit passed: {failed} of {seen} records failed "
                        f"({failed / seen:.1%} > limits.max_failed_fraction={lim.max_failed_fraction}); "
                        f"see the `error` column under {store.parts_root(cfg.output.path)}; rerun to resume"
                    )
            cache_stats = _cache_stats(cache_actor)
        finally:
            if cache_actor:
                ray.kill(cache_actor)
        removed = store.drop_duplicates(cfg.output.path)
        wall = time.time() - t0
        summary = pipeline.enrich_summary(
            cfg,
            wall=wall,
            processed_now=seen,
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


def _cache_stats(actor) -> dict:
    import ray

    if actor is None:
        return {}
    try:
        return ray.get(actor.stats.remote(), timeout=60)
    except _unreachable() as e:
        return {"unavailable": type(e).__name__}


def main(argv: list[str] | None = None) -> int:
    return job_main("enrich", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("enrich"))
