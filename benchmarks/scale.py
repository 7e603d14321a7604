"""Enrichment data plane at several catalog sizes, without model work. Writes JSON.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--out benchmarks/results/scale-cpu-2core.json]
        [--code DIR] [--label NAME] [--workdir DIR] [--set key=value ...] [--timeout 3600] [--clean]
    python benchmarks/scale.py --compare REF [--quick | --sizes ...] [--rounds 1]

`--compare REF` runs the current tree and REF (any commit of this repository, checked out once as a git worktree
under the workdir) side by side on the same catalogs, one after the other in one session, alternating which goes
first each round, and prints and writes (`--out`, default `bench-out/scale/compare.json`) each size's ratios:
current wall / REF wall for the first run and for the resume (> 1: the current tree is slower). Speeds are only
comparable this way: the same code ran up to 25% apart between two runs at 20k, and 2.7x apart between two
machines of the same kind. `--quick` is 20,000 records (about two minutes for both sides): run it before you stop
whenever a change touches the enrichment plane.

For each size N:
  1. a JSONL catalog of N valid MMECInstruct records (the 7 tasks in turn, explicit ids `r<i>`) whose
     images are local paths that do not exist (`/nonexistent/...`): the demo config allows local files,
     so every fetch fails at once with "not found" and no captioner or judge ever runs a model. What is
     left is the data plane: read, parse, resume filter, fetch/decode bookkeeping, the actor pools
     passing rows through, the Parquet writes, the driver's loop and the summary. Cached per N in the
     workdir (generated here with json.dumps, without the project's code).
  2. `<python> -m ray_jobs.enrich --config configs/enrich-demo.yaml --set input.path=... --set
     output.path=... [--set ...]` as a subprocess, cwd and PYTHONPATH = the code dir (`--code`: any
     checkout, e.g. a `git worktree` of an older commit), RAY_ADDRESS="" so that no running cluster is
     joined (the job starts its own). psutil samples every 0.2 s: the driver's RSS and the summed RSS of
     the driver and all its descendants (GCS, raylet, workers; summed RSS counts shared pages, the
     object store's included, once per process that touched them), and about once a second the summed
     PSS of the same tree (shared pages split between the processes).
  3. the job's `summary.json`: records, processed_this_run, skipped_already_done, wall_seconds,
     dataset_seconds, tail_seconds (null when the code does not report it), ok/partial/failed,
     errors_per_stage.
  4. the same command again into the same output: a resume of a finished run (processed_this_run
     should be 0); its wall, driver peak RSS and share of the first run's wall.
Across sizes: marginal records/s between consecutive sizes ((n2-n1)/(wall2-wall1): start-up cancels)
and the driver's peak RSS ratios. Each size's output folder is deleted after measuring; the catalogs
are kept unless --clean. A failed or timed-out run records its rc and the tail of its stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caslie_core.synthetic import INSTRUCTIONS  # noqa: E402 - the catalog's wording, one copy

CATALOG_VERSION = 1  # bump when the generated records change (cached catalogs are named by it)
MB = 1024 * 1024
SAMPLE_S = 0.2
PSS_EVERY = 5  # samples between PSS readings (smaps_rollup costs more than RSS)

# --- catalog ----------------------------------------------------------------------------------

TASK_ORDER = ("AP", "CC", "PRP", "PSI", "MPC", "SA", "SR")


def make_record(i: int) -> dict:
    """Record i: task i % 7, valid for `caslie_core.records.parse_record`, images that cannot exist."""
    abbr = TASK_ORDER[i % len(TASK_ORDER)]
    title = f"Acme product {i}"
    if abbr == "AP":
        inp, options, output, n_img = {"question": f"What color is product {i}?"}, [], "yes" if i % 2 else "no", 1
    elif abbr == "CC":
        inp, options, n_img = {"title": title}, ["A: Electronics", "B: Kitchen", "C: Toys", "D: Sports"], 1
        output = "ABCD"[i % 4]
    elif abbr == "PRP":
        inp = {"product 1": title, "product 2": f"Zenith product {i} bundle"}
        options, output, n_img = ["A: bought together", "B: viewed together", "C: similar"], "ABC"[i % 3], 2
    elif abbr == "PSI":
        inp = {"query": f"item {i} for home", "product title": f"{title} compatible"}
        options, output, n_img = [], "yes" if i % 2 else "no", 1
    elif abbr == "MPC":
        inp = {"query": f"item {i}", "product title": f"{title} official"}
        options, output, n_img = ["A: exact", "B: substitute", "C: complement", "D: irrelevant"], "ABCD"[i % 4], 1
    elif abbr == "SA":
        inp = {"review": f"I love product {i}, great value."}
        options, output, n_img = ["A: positive", "B: neutral", "C: negative"], "ABC"[i % 3], 1
    else:  # SR: input is the history list; one image per history item, then one per option
        inp = [f"1st: Acme item {i}-a", f"2nd: Nova item {i}-b"]
        options = [f"A: Orbit item {i}-c", f"B: Polar item {i}-d", f"C: Atlas item {i}-e bestseller"]
        output, n_img = "C", len(inp) + len(options)
    return {
        "id": f"r{i}",
        "task": abbr,
        "split": "test",
        "instruction": INSTRUCTIONS[abbr],
        "input": json.dumps(inp),
        "options": json.dumps(options),
        "output": output,
        "images": json.dumps([f"/nonexistent/img-{i}-{k}.jpg" for k in range(n_img)]),
    }


def ensure_catalog(workdir: Path, n: int) -> tuple[Path, float | None]:
    """The cached catalog of n records; (path, seconds spent generating it, None when cached)."""
    path = workdir / "catalogs" / f"catalog-v{CATALOG_VERSION}-{n}.jsonl"
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        chunk = []
        for i in range(n):
            chunk.append(json.dumps(make_record(i)))
            if len(chunk) >= 10_000:
                fh.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            fh.write("\n".join(chunk) + "\n")
    tmp.replace(path)
    return path, round(time.perf_counter() - t0, 2)


# --- running and sampling ---------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Peaks of the driver's RSS, the tree's summed RSS and (every PSS_EVERY samples) summed PSS."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.procs: dict[int, psutil.Process] = {pid: self.root}
        self.seen: dict[int, psutil.Process] = {pid: self.root}  # every process seen (pid reuse checked)
        self.stop_event = threading.Event()
        self.driver_peak = self.tree_peak = self.pss_peak = 0
        self.max_procs = 0
        self.samples = 0

    def tree(self) -> list[psutil.Process]:
        try:
            for child in self.root.children(recursive=True):
                if child.pid not in self.procs:
                    self.procs[child.pid] = child
                    self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass
        return list(self.procs.values())

    def sample(self) -> None:
        procs = self.tree()
        want_pss = self.samples % PSS_EVERY == 0
        rss = pss = 0
        alive = 0
        for p in procs:
            try:
                if want_pss:
                    info = p.memory_full_info()
                    r, s = info.rss, getattr(info, "pss", 0)
                else:
                    r, s = p.memory_info().rss, 0
            except psutil.NoSuchProcess:
                self.procs.pop(p.pid, None)
                continue
            except psutil.Error:
                continue
            alive += 1
            rss += r
            pss += s
            if p.pid == self.root.pid:
                self.driver_peak = max(self.driver_peak, r)
        self.tree_peak = max(self.tree_peak, rss)
        if want_pss:
            self.pss_peak = max(self.pss_peak, pss)
        self.max_procs = max(self.max_procs, alive)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _session_procs(driver_pid: int) -> dict[int, psutil.Process]:
    """Processes of the Ray session the job's driver started (its name ends in the driver's pid): workers
    whose raylet is gone are re-parented away from the job's tree but still carry it on their command line."""
    mark = re.compile(rf"session_[0-9_-]+_{driver_pid}(?![0-9])")
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real != os.getuid():
                continue
            if any(mark.search(a) for a in p.info["cmdline"] or ()):
                found[p.pid] = p
        except psutil.Error:
            continue
    return found


def _end(candidates: list[psutil.Process], *, grace: float) -> tuple[int, int]:
    """End those of these processes (the job's own; psutil checks that a pid was not reused) still alive
    after `grace` seconds; (alive at the start, ended)."""
    procs = []
    for p in candidates:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace) if procs else ([], [])
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=10)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs), len(alive)


def run_job(cmd: list[str], *, cwd: Path, env: dict, log_base: Path, timeout: float) -> dict:
    """Run one job; wall time, memory peaks, rc and (on failure) the stderr tail."""
    out_log, err_log = log_base.with_suffix(".stdout"), log_base.with_suffix(".stderr")
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            sampler.stop()
            sampler.tree()
            proc.terminate()  # the driver first: it shuts its cluster down
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        wall = time.perf_counter() - t0
    sampler.stop()
    # Ray's processes should go with the driver (ray.shutdown); orphaned workers exit by themselves when they
    # lose their raylet. Those still alive after a grace period are counted and ended (ours, by pid).
    ours = {**_session_procs(proc.pid), **sampler.seen}
    ours.pop(proc.pid, None)
    stragglers, killed = _end(list(ours.values()), grace=30)
    res = {
        "rc": rc,
        "timed_out": timed_out,
        "wall_s": round(wall, 2),
        "driver_peak_rss_mb": round(sampler.driver_peak / MB, 1),
        "tree_peak_rss_mb": round(sampler.tree_peak / MB, 1),
        "tree_peak_pss_mb": round(sampler.pss_peak / MB, 1) if sampler.pss_peak else None,
        "max_processes": sampler.max_procs,
        "samples": sampler.samples,
        "processes_left_at_exit": stragglers,
        "processes_killed_after_grace": killed,
        "stdout_log": str(out_log),
        "stderr_log": str(err_log),
    }
    if rc != 0 or timed_out:
        res["stderr_tail"] = _tail(err_log)
    return res


SUMMARY_KEYS = (
    "records",
    "processed_this_run",
    "skipped_already_done",
    "wall_seconds",
    "dataset_seconds",
    "tail_seconds",
    "ok",
    "partial",
    "failed",
    "errors_per_stage",
)


def read_summary(output: Path) -> dict | None:
    try:
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    picked = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    picked.setdefault("tail_seconds", None)
    return picked


def _ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b else None


def measure(n: int, args, python: str, code: Path, env: dict, workdir: Path) -> dict:
    catalog, gen_s = ensure_catalog(workdir, n)
    output = workdir / "out" / f"{args.label}-{n}"
    if output.exists():
        shutil.rmtree(output)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "ray_jobs.enrich", "--config", args.config]
    cmd += ["--set", f"input.path={catalog}", "--set", f"output.path={output}"]
    for s in args.set:
        cmd += ["--set", s]
    res: dict = {"n": n, "catalog": str(catalog), "catalog_generate_s": gen_s, "catalog_bytes": catalog.stat().st_size}
    print(f"[scale] n={n}: first run ...", flush=True)
    first = run_job(cmd, cwd=code, env=env, log_base=logs / f"{args.label}-{n}-first", timeout=args.timeout)
    first["summary"] = read_summary(output)
    res["first"] = first
    ok = first["rc"] == 0 and not first["timed_out"] and first["summary"] is not None
    summary = first["summary"] or {}
    res.update(
        records_per_s=round(n / first["wall_s"], 1) if ok else None,
        wall_s=first["wall_s"],
        driver_peak_rss_mb=first["driver_peak_rss_mb"],
        tree_peak_rss_mb=first["tree_peak_rss_mb"],
        tree_peak_pss_mb=first["tree_peak_pss_mb"],
        tail_seconds=summary.get("tail_seconds"),
        status={k: summary.get(k) for k in ("ok", "partial", "failed")},
        ok=ok,
    )
    if ok:
        print(f"[scale] n={n}: first run {first['wall_s']} s; resume ...", flush=True)
        resume = run_job(cmd, cwd=code, env=env, log_base=logs / f"{args.label}-{n}-resume", timeout=args.timeout)
        resume["summary"] = read_summary(output)
        res["resume"] = resume
        rsum = resume["summary"] or {}
        res.update(
            resume_ok=resume["rc"] == 0 and not resume["timed_out"],
            resume_wall_s=resume["wall_s"],
            resume_driver_peak_rss_mb=resume["driver_peak_rss_mb"],
            resume_processed_this_run=rsum.get("processed_this_run"),
            resume_share=_ratio(resume["wall_s"], first["wall_s"]),
        )
    else:
        print(f"[scale] n={n}: FAILED rc={first['rc']} timed_out={first['timed_out']}", flush=True)
        res.update(resume_ok=None, resume_wall_s=None, resume_driver_peak_rss_mb=None, resume_share=None)
        res["resume_processed_this_run"] = None
    if not args.keep_output:
        shutil.rmtree(output, ignore_errors=True)
    if args.clean:
        catalog.unlink(missing_ok=True)
    return res


def across(results: list[dict]) -> dict:
    good = [r for r in results if r["ok"]]
    steps = []
    for a, b in zip(good, good[1:]):
        dw = b["wall_s"] - a["wall_s"]
        dn = b["n"] - a["n"]
        steps.append(
            {
                "from": a["n"],
                "to": b["n"],
                "marginal_records_per_s": round(dn / dw, 1) if dw > 0 else None,
                "driver_rss_ratio": _ratio(b["driver_peak_rss_mb"], a["driver_peak_rss_mb"]),
                "tree_rss_ratio": _ratio(b["tree_peak_rss_mb"], a["tree_peak_rss_mb"]),
                "driver_rss_bytes_per_record": round((b["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]) * MB / dn, 1),
                "tree_rss_bytes_per_record": round((b["tree_peak_rss_mb"] - a["tree_peak_rss_mb"]) * MB / dn, 1),
            }
        )
    return {
        "steps": steps,
        "driver_rss_ratio_largest_vs_previous": steps[-1]["driver_rss_ratio"] if steps else None,
        "tree_rss_ratio_largest_vs_previous": steps[-1]["tree_rss_ratio"] if steps else None,
    }


# --- environment ------------------------------------------------------------------------------


def child_env(code: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(code), env.get("PYTHONPATH", "")] if p)
    env["RAY_ADDRESS"] = ""  # never join a running cluster: the job starts (and stops) its own
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def probe(python: str, code: Path, env: dict) -> dict:
    """What the child imports: Ray's version and where caslie_core and ray_jobs come from."""
    src = (
        "import json, caslie_core, ray_jobs, ray, sys;"
        "print(json.dumps({'ray': ray.__version__, 'python': sys.version.split()[0],"
        "'caslie_core': caslie_core.__file__, 'ray_jobs': ray_jobs.__file__}))"
    )
    try:
        out = subprocess.run([python, "-c", src], cwd=code, env=env, capture_output=True, text=True, timeout=120)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    info["imports_from_code_dir"] = all(
        Path(info[k]).resolve().is_relative_to(code.resolve()) for k in ("caslie_core", "ray_jobs")
    )
    return info


def git_info(code: Path) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(code), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": len(status.splitlines()) if status else 0}


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "cpu_model": platform.processor() or None,
    }


def print_table(results: list[dict], summary: dict) -> None:
    head = (
        f"{'n':>9} {'wall s':>8} {'rec/s':>8} {'drv MB':>8} {'tree MB':>8} {'pss MB':>8} {'tail s':>7} "
        f"{'resume s':>8} {'share':>6} {'res#':>5}  status"
    )
    print(head)

    def f(v, w):
        return f"{'-' if v is None else v:>{w}}"

    for r in results:
        st = r["status"]
        status = f"ok={st.get('ok')} partial={st.get('partial')} failed={st.get('failed')}"
        if not r["ok"]:
            status = f"RUN FAILED rc={r['first']['rc']}" + (" (timeout)" if r["first"]["timed_out"] else "")
        print(
            f"{r['n']:>9} {f(r['wall_s'], 8)} {f(r['records_per_s'], 8)} {f(r['driver_peak_rss_mb'], 8)} "
            f"{f(r['tree_peak_rss_mb'], 8)} {f(r['tree_peak_pss_mb'], 8)} {f(r['tail_seconds'], 7)} "
            f"{f(r['resume_wall_s'], 8)} {f(r['resume_share'], 6)} {f(r['resume_processed_this_run'], 5)}  {status}"
        )
    for s in summary["steps"]:
        print(
            f"  {s['from']} -> {s['to']}: marginal {s['marginal_records_per_s']} records/s, "
            f"driver RSS x{s['driver_rss_ratio']} ({s['driver_rss_bytes_per_record']} B/record), "
            f"tree RSS x{s['tree_rss_ratio']} ({s['tree_rss_bytes_per_record']} B/record)"
        )


def ref_worktree(ref: str, workdir: Path) -> tuple[Path, str]:
    """A git worktree of `ref` (commit, tag or branch of this repository) under the workdir, made once per commit."""
    r = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"[scale] --compare {ref}: not a commit of {ROOT}: {r.stderr.strip()}")
    sha = r.stdout.strip()
    path = workdir / "refs" / sha[:12]
    if not (path / "ray_jobs").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), sha], check=True)
    return path, sha


def _best(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return min(values) if values else None


def compare(args, sizes: list[int], workdir: Path, out_path: Path) -> int:
    """The current tree against `args.compare`, side by side: best of `args.rounds` per side and size."""
    ref_code, ref_sha = ref_worktree(args.compare, workdir)
    sides = {"current": Path(args.code).resolve(), "ref": ref_code}
    info = {side: {"dir": str(code), **git_info(code)} for side, code in sides.items()}
    runs: dict = {side: {n: [] for n in sizes} for side in sides}
    pairs = []
    for n in sizes:
        for k in range(args.rounds):
            for side in ["current", "ref"] if k % 2 == 0 else ["ref", "current"]:
                code = sides[side]
                side_args = argparse.Namespace(**{**vars(args), "label": f"{side}-r{k}"})
                runs[side][n].append(measure(n, side_args, args.python, code, child_env(code), workdir))
        cur, ref = runs["current"][n], runs["ref"][n]
        pair = {
            "n": n,
            "current_wall_s": _best(cur, "wall_s"),
            "ref_wall_s": _best(ref, "wall_s"),
            "current_resume_s": _best(cur, "resume_wall_s"),
            "ref_resume_s": _best(ref, "resume_wall_s"),
            "all_ok": all(r["ok"] and r.get("resume_ok") for r in cur + ref),
        }
        pair["wall_ratio"] = _ratio(pair["current_wall_s"], pair["ref_wall_s"])
        pair["resume_ratio"] = _ratio(pair["current_resume_s"], pair["ref_resume_s"])
        pairs.append(pair)
        report = {
            "benchmark": "enrich data plane, current tree vs a reference commit, side by side",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "ref": {"asked": args.compare, "commit": ref_sha},
            "code": info,
            "rounds": args.rounds,
            "config": args.config,
            "extra_sets": args.set,
            "pairs": pairs,
            "runs": runs,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for p in pairs:
        print(
            f"[scale] n={p['n']}: current {p['current_wall_s']} s (resume {p['current_resume_s']} s), "
            f"{args.compare} ({ref_sha[:10]}) {p['ref_wall_s']} s (resume {p['ref_resume_s']} s): "
            f"current/ref wall x{p['wall_ratio']}, resume x{p['resume_ratio']}"
            + ("" if p["all_ok"] else "; A RUN FAILED")
        )
    print(f"[scale] wrote {out_path}")
    return 0 if all(p["all_ok"] for p in pairs) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated catalog sizes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale-cpu-2core.json"))
    ap.add_argument("--code", default=str(ROOT), help="the checkout to run (cwd and PYTHONPATH of the job)")
    ap.add_argument("--label", default=None, help="name of this run (default: the code dir's short commit)")
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "scale"), help="catalogs, outputs and logs")
    ap.add_argument("--config", default="configs/enrich-demo.yaml", help="job config, relative to the code dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra job overrides")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the job (default: this one)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job run before it is killed")
    ap.add_argument("--clean", action="store_true", help="delete each catalog after its size is measured")
    ap.add_argument("--keep-output", action="store_true", help="keep each size's output folder (debugging)")
    ap.add_argument("--compare", metavar="REF", help="run the current tree and commit REF side by side; print ratios")
    ap.add_argument("--rounds", type=int, default=1, help="--compare: rounds per size (alternating order; best kept)")
    ap.add_argument("--quick", action="store_true", help="20,000 records only (with --compare: about two minutes)")
    args = ap.parse_args(argv)

    sizes = [20000] if args.quick else sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    code = Path(args.code).resolve()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.compare:
        out = args.out if "--out" in (argv if argv is not None else sys.argv) else workdir / "compare.json"
        return compare(args, sizes, workdir, Path(out).resolve())
    out_path = Path(args.out).resolve()
    env = child_env(code)
    git = git_info(code)
    args.label = args.label or (git["commit"] or "nogit")[:10]
    child = probe(args.python, code, env)
    if not child.get("imports_from_code_dir", False):
        print(f"[scale] warning: the job may not import the code dir {code}: {child}", file=sys.stderr)

    results = []
    for n in sizes:
        results.append(measure(n, args, args.python, code, env, workdir))
        summary = across(results)
        report = {
            "benchmark": "enrich data plane at scale (images fail at fetch: no model work)",
            "label": args.label,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {**machine(), "python": child.get("python"), "ray": child.get("ray")},
            "code": {"dir": str(code), **git, "child_imports": child},
            "command": {
                "python": args.python,
                "config": args.config,
                "extra_sets": args.set,
                "timeout_s": args.timeout,
                "sample_interval_s": SAMPLE_S,
            },
            "catalog_version": CATALOG_VERSION,
            "sizes": sizes,
            "results": results,
            "across_sizes": summary,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")  # after every size: a killed run keeps its figures
    print_table(results, across(results))
    print(f"[scale] wrote {out_path}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
