"""Resume: Ray Data's own checkpointing (`CheckpointConfig(id_column="id")`) against our anti-join. JSON out.

    python benchmarks/resume.py [--sizes 100000,1000000] [--out benchmarks/results/resume-cpu-2core.json]

The same catalog as `benchmarks/scale.py` (N JSONL records with explicit ids), the same pass-through
work stage and the same Parquet sink, three ways, each phase a fresh process with its own local Ray
(as a user's rerun is a new job):

- `plain`: `read_json -> map_batches -> write_parquet`, no resume at all (the floor);
- `ray_checkpoint`: the same with `DataContext.checkpoint_config = CheckpointConfig(id_column="id",
  checkpoint_path=...)`. Ray Data writes the ids of every written block to the checkpoint path, and on
  a rerun loads them all (a sorted array in the object store) and filters rows inside the read tasks.
  It needs the id as a column at read time and a plan that ends in a `Write`;
- `anti_join` (what `caslie enrich` does): a task scans the output's `id` columns into sorted 16-byte
  digests (`caslie_core.io.ledger.scan`); the parse stage reads each JSON line, looks the batch's ids
  up at once (`DoneIds.many`) and drops the finished ones. Reads with `read_text`, like the job.

Phases per method: `first` (empty output), `resume_half` (output holding the first half of the catalog:
written by a run over a half-size catalog, then the full catalog rerun) and `resume_done` (a rerun of
the full catalog into its finished output). Reported: wall seconds of each phase (from `ray.init` to
the write's end, and the dataset alone), rows written, and each resume's share of that method's first run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = ("plain", "ray_checkpoint", "anti_join")


def _work(batch):
    """The pass-through stage both pipelines share (a cheap column touch, so the stage is not elided)."""
    import pyarrow.compute as pc

    return batch.append_column("id_len", pc.utf8_length(batch.column("id")))


def _parse_filter(batch, done_ref):
    """anti_join: JSON lines -> record columns, finished ids dropped (one vectorised lookup per batch)."""
    import pyarrow as pa
    import ray

    from caslie_core.io import ledger

    rows = [json.loads(t) for t in batch.column("text").to_pylist()]
    if done_ref is not None:
        done = _DONE.get(done_ref.hex()) or _DONE.setdefault(done_ref.hex(), ledger.DoneIds(ray.get(done_ref)))
        keep = done.many([r["id"] for r in rows])
        rows = [r for r, k in zip(rows, keep) if not k]
    cols = ("id", "task", "split", "instruction", "input", "options", "output", "images")
    return pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols})


_DONE: dict = {}


def phase(method: str, catalog: str, out: str, ckpt: str) -> dict:
    """One run of one method in this process: {wall_s, dataset_s, rows_written}."""
    t0 = time.perf_counter()
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        before = _rows(out)
        if method == "ray_checkpoint":
            from ray.data.checkpoint import CheckpointConfig

            ctx.checkpoint_config = CheckpointConfig(
                id_column="id", checkpoint_path=ckpt, delete_checkpoint_on_success=False
            )
        if method in ("plain", "ray_checkpoint"):
            ds = ray.data.read_json(catalog).map_batches(_work, batch_format="pyarrow")
        else:
            from caslie_core.io.ledger import scan

            done_ref, _, n_ref = ray.remote(num_cpus=0, num_returns=3)(scan).remote(out)
            done = done_ref if ray.get(n_ref) else None
            ds = ray.data.read_text(catalog).map_batches(
                _parse_filter, batch_format="pyarrow", fn_kwargs={"done_ref": done}
            )
            ds = ds.map_batches(_work, batch_format="pyarrow")
        ds.write_parquet(out + "/records")  # where `ledger.scan` looks (the job's layout)
        t_end = time.perf_counter()
        return {
            "wall_s": round(t_end - t0, 2),
            "ray_start_s": round(t_ray - t0, 2),
            "dataset_s": round(t_end - t_ray, 2),
            "rows_written": _rows(out) - before,
        }
    finally:
        ray.shutdown()


def _rows(out: str) -> int:
    import pyarrow.parquet as pq

    p = Path(out)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in p.rglob("*.parquet")) if p.exists() else 0


def _child(method: str, catalog: Path, out: Path, ckpt: Path) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--phase", method, "--catalog", str(catalog), "--output", str(out)]
    proc = subprocess.run([*cmd, "--ckpt", str(ckpt)], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"rc": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n: int, workdir: Path) -> dict:
    from scale import ensure_catalog

    catalog, _ = ensure_catalog(workdir, n)
    half = workdir / "catalogs" / f"half-of-{catalog.name}"
    if not half.exists():
        with open(catalog) as src, open(half, "w") as dst:
            for i, line in enumerate(src):
                if i >= n // 2:
                    break
                dst.write(line)
    result: dict = {"n": n}
    for method in METHODS:
        out, ckpt = workdir / "resume" / method / "out", workdir / "resume" / method / "ckpt"
        runs: dict = {}

        def fresh(folder=out.parent):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

        fresh()
        runs["first"] = _child(method, catalog, out, ckpt)
        if method != "plain":
            runs["resume_done"] = _child(method, catalog, out, ckpt)
            fresh()
            _child(method, half, out, ckpt)
            runs["resume_half"] = _child(method, catalog, out, ckpt)
            first = runs["first"].get("wall_s")
            for k in ("resume_done", "resume_half"):
                if first and "wall_s" in runs[k]:
                    runs[k]["share_of_first"] = round(runs[k]["wall_s"] / first, 3)
        shutil.rmtree(out.parent, ignore_errors=True)
        result[method] = runs
        print(f"n={n:,} {method}: {json.dumps(runs)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume-cpu-2core.json"))
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "scale"))
    ap.add_argument("--phase", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--catalog", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args.phase, args.catalog, args.output, args.ckpt)))
        return 0
    import ray

    results = [measure(int(s), Path(args.workdir)) for s in args.sizes.split(",")]
    doc = {
        "benchmark": "resume: Ray Data CheckpointConfig(id_column) vs the anti-join of caslie enrich",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "ray": ray.__version__},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
