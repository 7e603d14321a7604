"""Catalog enrichment on Ray Data: captions (EC3), judge votes (CQE) and enriched records out.

    python -m ray_jobs.enrich --config configs/enrich-demo.yaml [--set key=value ...]

Recipe: parse config -> connect -> read records -> validate -> fetch -> decode -> captioner pool ->
one pool per judge -> finalize + write Parquet parts -> summary. Rows are one per record, so the
graph streams end to end with no shuffle. Rerunning into the same output resumes: records already
written are skipped (parts are written atomically, keyed by record id).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pyarrow as pa

from caslie_core import stages
from caslie_core.config import config_hash, write_resolved
from caslie_core.errors import CaslieError
from caslie_core.images import FetchPolicy
from caslie_core.jobconfigs import EnrichConfig
from caslie_core.records import detect_format, iter_raw_rows
from ray_jobs.common import configure_data_context, init_ray, job_main, to_table

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


# ------------------------------------------------------------------------------------------ reading


def _expand(path: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        found = sorted(p for p in fs.find(root) if _is_records_file(p))
        if not found:
            raise CaslieError(f"input.path {path}: folder has no .jsonl, .json or .parquet files")
        return [fs.unstrip_protocol(p) if "://" in path else p for p in found]
    return [path]


def _is_records_file(path: str) -> bool:
    from caslie_core.errors import SourceError

    try:
        detect_format(path)
        return True
    except SourceError:
        return False


def read_raw(cfg: EnrichConfig):
    """Dataset of raw rows, each `{"text": <one record as JSON>}`, from every input file."""
    import fsspec
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = []
    for p in [cfg.input.path] if isinstance(cfg.input.path, str) else cfg.input.path:
        paths.extend(_expand(p))
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


# ------------------------------------------------------------------------------------- CPU stages

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


# ----------------------------------------------------------------------------------- actor shims


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


class CaptionCacheActor:
    """Holds finished captions and in-flight claims. Claims expire after `ttl` seconds; a restarted
    actor keeps its actor id, so it takes its own claims back at once."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.done: dict[str, str | None] = {}
        self.claims: dict[str, tuple[str, float]] = {}
        self.ttl = ttl
        self.max_entries = max_entries
        self.hits = 0

    def claim(self, keys: list[str], owner: str) -> dict[str, Any]:
        now = time.monotonic()
        out = {}
        for k in keys:
            if k in self.done:
                out[k] = ("hit", self.done[k])
                self.hits += 1
                continue
            holder = self.claims.get(k)
            if holder and holder[0] != owner and now - holder[1] < self.ttl:
                out[k] = ("pending", None)
            else:
                self.claims[k] = (owner, now)
                out[k] = ("mine", None)
        return out

    def put(self, items: dict[str, str | None], owner: str) -> None:
        for k, v in items.items():
            self.done[k] = v
            self.claims.pop(k, None)
        while len(self.done) > self.max_entries:
            self.done.pop(next(iter(self.done)))

    def release(self, keys: list[str], owner: str) -> None:
        for k in keys:
            if self.claims.get(k, ("", 0))[0] == owner:
                del self.claims[k]

    def stats(self) -> dict:
        return {"entries": len(self.done), "hits": self.hits, "claims": len(self.claims)}


class CaptionActor:
    def __init__(self, captioner: dict, size: int, cache: tuple[str, str] | None, wait_s: float) -> None:
        from caslie_core.captioning import Captioner
        from caslie_core.jobconfigs import CaptionerConfig

        c = CaptionerConfig.model_validate(captioner)
        model = Captioner(
            c.model,
            revision=c.revision,
            dtype=c.dtype,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.micro_batch,
            trust_remote_code=c.trust_remote_code,
        )
        self.stage = stages.CaptionStage(
            model, size, _RayCache(*cache) if cache else None, owner=_actor_id(), wait_s=wait_s
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.stage(batch.to_pylist()), CAPTIONED)


class JudgeActor:
    def __init__(self, judge: dict, columns: dict) -> None:
        from caslie_core.jobconfigs import JudgeConfig
        from caslie_core.judging import Judge

        j = JudgeConfig.model_validate(judge)
        model = Judge(
            j.model,
            mode=j.mode,
            revision=j.revision,
            dtype=j.dtype,
            max_new_tokens=j.max_new_tokens,
            batch_size=j.micro_batch,
            trust_remote_code=j.trust_remote_code,
        )
        self.stage = stages.JudgeStage(model, j.name)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.stage(batch.to_pylist()), self.columns)


# ------------------------------------------------------------------------------------------ writing


def parts_root(output: str) -> str:
    return output.rstrip("/") + "/records"


def write_batch(batch: pa.Table, output: str, judge_names: list[str], provenance: dict, partition: bool) -> pa.Table:
    """Finalize rows and write them as Parquet parts, atomically (temp name, then rename)."""
    import fsspec
    import pyarrow.parquet as pq

    rows = stages.finalize_rows(batch.to_pylist(), judge_names=judge_names, provenance=provenance)
    fs, root = fsspec.core.url_to_fs(parts_root(output))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(stages.partition_value(r["task"] or "") if partition else "", []).append(r)
    written = []
    schema = stages.output_schema()
    for value, group in groups.items():
        folder = f"{root}/task={value}" if partition else root
        fs.makedirs(folder, exist_ok=True)
        name = "part-" + hashlib.sha1("\n".join(sorted(r["id"] for r in group)).encode()).hexdigest()[:20]
        final = f"{folder}/{name}.parquet"
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}.parquet"
        table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in group], schema=schema)
        with fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh)
        fs.mv(tmp, final)
        written.extend({"id": r["id"], "status": r["status"], "task": value, "path": final} for r in group)
    return to_table(written, WRITTEN)


def list_parts(output: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(parts_root(output))
    if not fs.exists(root):
        return []
    files = [p for p in fs.find(root) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    return [fs.unstrip_protocol(p) if "://" in output else p for p in files]


def read_output(output: str, columns: list[str] | None = None) -> list[dict]:
    """All written output rows (small columns for summaries and tests)."""
    import fsspec
    import pyarrow.parquet as pq

    rows = []
    for path in list_parts(output):
        with fsspec.open(path, "rb") as fh:
            rows.extend(pq.read_table(fh, columns=columns).to_pylist())
    return rows


def drop_duplicates(output: str) -> int:
    """Keep one row per id across parts; return how many rows were removed.

    A killed driver's write tasks can still finish after it died (Ray stops a dead job's workers
    within seconds, not at once), so a rerun that started meanwhile may write some records again.
    Parts are visited in name order; a later part loses the ids seen before (rewritten atomically,
    deleted when empty)."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen: set[str] = set()
    removed = 0
    for path in sorted(list_parts(output)):
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as fh:
            ids = pq.read_table(fh, columns=["id"]).column("id").to_pylist()
        dup = [i for i in ids if i in seen]
        seen.update(ids)
        if not dup:
            continue
        removed += len(dup)
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh)
        keep = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=pa.array(sorted(set(dup))))))
        if keep.num_rows == 0:
            fs.rm(p)
            continue
        folder, name = p.rsplit("/", 1)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        with fs.open(tmp, "wb") as fh:
            pq.write_table(keep, fh)
        fs.mv(tmp, p)
    return removed


def done_ids(output: str) -> frozenset:
    return frozenset(r["id"] for r in read_output(output, ["id"]))


# ------------------------------------------------------------------------------------------- the job


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
    prov = stages.provenance(cfg, chash, run_id)
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
        previous = done_ids(cfg.output.path)
        done_ref = ray.put(previous) if previous else None
        cache_actor, cache = None, None
        if cfg.dedup.enabled:
            name, ns = f"caslie-caption-cache-{run_id}", "caslie"
            # On the driver's node (it lives as long as the job does); restarted empty if that fails anyway.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            cache_actor = (
                ray.remote(num_cpus=0)(CaptionCacheActor)
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
                        f"see the `error` column under {parts_root(cfg.output.path)}; rerun to resume"
                    )
            cache_stats = _cache_stats(cache_actor)
        finally:
            if cache_actor:
                ray.kill(cache_actor)
        removed = drop_duplicates(cfg.output.path)
        wall = time.time() - t0
        summary = make_summary(
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
        print(
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


def make_summary(
    cfg: EnrichConfig, *, wall: float, processed_now: int, resumed: int, cache_stats: dict, chash: str, run_id: str
) -> dict:
    rows = read_output(cfg.output.path, ["id", "task", "status", "error", "image_results"])
    counts = stages.summarize(rows)
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
        "records_path": parts_root(cfg.output.path),
        "run_id": run_id,
        "config_hash": chash,
        "config": cfg.model_dump(mode="json"),
    }


def main(argv: list[str] | None = None) -> int:
    return job_main("enrich", EnrichConfig, run, __doc__, argv)


if __name__ == "__main__":
    import sys

    from ray_jobs.cli import run_job_module

    sys.exit(run_job_module("enrich"))
