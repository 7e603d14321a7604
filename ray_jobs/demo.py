"""`caslie demo`: every stage that exists, on the embedded default, with a summary of where things are."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .common import log, verbose_mode

STAGES = ("catalog", "enrich", "train", "evaluate", "serve")


def run_demo(workdir: str, *, records: int = 1050, seed: int = 0) -> dict:
    """Run every stage on the embedded default; write `workdir/summary.json`.

    Each stage's section has the same shape: `output` (its folder, or None), `files` (what is in it worth
    opening), `config` and `command` (the job a cluster user would submit for it), `figures` (headline numbers)
    and `seconds`.
    """
    from caslie_core.models.tiny import ensure_tiny_models

    t0 = time.time()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = ensure_tiny_models()
    print(f"[demo] tiny models ready under {Path(models['lm']).parent}")
    if not verbose_mode():  # the jobs' own lines are summed up in one line per stage here
        log.setLevel(logging.WARNING)
    summary: dict = {"workdir": str(work), "tiny_models": models, "stages": {}}
    steps = {
        "catalog": lambda: _catalog(work, records, seed),
        "enrich": lambda: _enrich(work),
        "train": lambda: _train(work),
        "evaluate": lambda: _evaluate(work),
        "serve": lambda: _serve(work),
    }
    try:
        for name in STAGES:
            print(f"[demo] {name}: started", flush=True)
            t = time.time()
            section = steps[name]()
            section["seconds"] = round(time.time() - t, 2)
            summary["stages"][name] = section
            print(f"[demo] {name}: done in {section['seconds']:.0f} s; {section.pop('headline')}", flush=True)
    finally:
        log.setLevel(logging.INFO)
    summary["seconds"] = round(time.time() - t0, 2)
    summary["summary"] = str(work / "summary.json")
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_where(summary)
    return summary


def _print_where(summary: dict) -> None:
    print(f"[demo] done in {summary['seconds']:.0f} s. Where everything is:")
    for name, s in summary["stages"].items():
        figures = ", ".join(f"{k} {_short(v)}" for k, v in s["figures"].items() if not isinstance(v, dict))
        print(f"  {name:<9} {s['output'] or '(no files: the app was stopped after the request)'}")
        print(f"  {'':<9} {figures}")
        for label, path in s["files"].items():
            print(f"  {'':<9} {label}: {path}")
        print(f"  {'':<9} again: {s['command']}")
    print(f"  {'summary':<9} {summary['summary']}")
    if not verbose_mode():
        print(
            f"  {'ray logs':<9} /tmp/ray/session_latest/logs (each stage's Ray session under /tmp/ray/); --verbose shows them"
        )


def _short(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _section(output: Path | None, config: str, command: str, figures: dict, headline: str = "", **files) -> dict:
    return {
        "headline": headline,
        "output": str(output) if output else None,
        "files": {k: str(v) for k, v in files.items()},
        "config": config,
        "command": command,
        "figures": figures,
    }


def _catalog(work: Path, records: int, seed: int) -> dict:
    from caslie_core.world.catalog import write_world_catalog

    m = write_world_catalog(work / "catalog", records, seed=seed, broken_images=max(3, records // 175))
    headline = (
        f"synthetic catalog v2: {m['records']} records, {m['images']} images ({m['uninformative_images']} "
        f"uninformative, {len(m['broken_images'])} broken on purpose); CC, MPC and PSI are decided by the "
        f"pictures only; {m['test_records_per_task']} test records per task"
    )
    return _section(
        work / "catalog",
        "",
        f"caslie synth {work / 'catalog'} --records {records} --seed {seed} --broken-images {len(m['broken_images'])}",
        {
            "records": m["records"],
            "images": m["images"],
            "broken_images": len(m["broken_images"]),
            "uninformative_images": m["uninformative_images"],
            "splits": m["splits"],
            "test_records_per_task": m["test_records_per_task"],
        },
        records=work / "catalog" / "records.jsonl",
        manifest=work / "catalog" / "manifest.json",
        headline=headline,
    )


def _job(job: str, overrides: list[str], kind: str = "demo"):
    """Load `configs/<job>-<kind>.yaml` with the demo's paths, as `caslie <job> CONFIG --set ...` would (`world`:
    the configs whose captioner and judges are trained on the synthetic world)."""
    from .common import ROOT, load_job_config

    config = f"configs/{job}-{kind}.yaml"
    cfg = load_job_config(job, ROOT / config, overrides)
    command = " ".join([f"caslie {job} {config}", *(f"--set {o}" for o in overrides)])
    return cfg, config, command


def _enrich(work: Path) -> dict:
    from . import enrich

    cfg, config, command = _job(
        "enrich", [f"input.path={work / 'catalog' / 'records.jsonl'}", f"output.path={work / 'enriched'}"], "world"
    )
    s = enrich.run(cfg)
    return _section(
        work / "enriched",
        config,
        command,
        {
            "records": s["records"],
            "ok": s["ok"],
            "partial": s["partial"],
            "failed": s["failed"],
            "kept_share": s["kept_share"],
            "errors_per_stage": s["errors_per_stage"],
        },
        records=s["records_path"],
        report=s.get("report", "(not written: see the log)"),
        summary=work / "enriched" / "summary.json",
        headline=f"{s['records']} records: {s['ok']} ok, {s['partial']} partial, {s['failed']} failed; kept share per task {s['kept_share']}",
    )


def _train(work: Path) -> dict:
    from . import train

    cfg, config, command = _job(
        "train",
        [f"input.path={work / 'enriched'}", f"run.storage_path={work / 'train-runs'}", f"output.path={work / 'model'}"],
    )
    s = train.run(cfg)
    curve = s["loss_curve"]
    losses = curve["loss"]
    marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1}) if losses else []
    headline = (
        f"{s['steps']} steps; loss curve: "
        + ", ".join(f"step {curve['steps'][i]}: {losses[i]:.3f}" for i in marks)
        + (f"; eval loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else "")
    )
    return _section(
        work / "model",
        config,
        command,
        {
            "steps": s["steps"],
            "train_rows": s["data"]["train_rows_used"],
            "skipped_failed": s["data"]["skipped_failed"],
            "loss_first": curve["first"],
            "loss_last": curve["last"],
            "eval_loss": s["eval_loss"],
            "tokens_per_s": s["tokens_per_s"],
        },
        adapter=s["adapter"],
        summary=work / "model" / "summary.json",
        checkpoints=s["storage"],
        headline=headline,
    )


def _evaluate(work: Path) -> dict:
    from . import evaluate

    cfg, config, command = _job(
        "evaluate",
        [f"model.path={work / 'model'}", f"input.path={work / 'enriched'}", f"output.path={work / 'evaluation'}"],
    )
    s = evaluate.run(cfg)
    effect = caption_effect(json.loads(Path(s["results"]["json"]).read_text())["scores"])
    return _section(
        work / "evaluation",
        config,
        command,
        {
            "prompts": s["prompts"],
            "invalid": s["invalid"],
            "not_evaluated": s["not_evaluated"],
            "prompts_per_second": s["prompts_per_second"],
            "kept_minus_none": effect,
        },
        table=s["results"]["markdown"],
        chart=s["results"]["chart"],
        results=s["results"]["json"],
        summary=work / "evaluation" / "summary.json",
        headline=f"{s['prompts']} prompts, {s['invalid']} invalid answers; kept captions minus none (test split): "
        + ", ".join(f"{a} {d:+.3f}" for a, d in effect.items())
        + f"; table {s['results']['markdown']}",
    )


def caption_effect(scores: dict, split: str = "test") -> dict:
    """Per task, the primary metric with kept captions minus without any (what the captions bring)."""
    kept, none = scores.get("kept", {}).get(split, {}), scores.get("none", {}).get(split, {})
    scored = [a for a in kept if a in none and kept[a]["score"] is not None and none[a]["score"] is not None]
    return {a: round(kept[a]["score"] - none[a]["score"], 3) for a in scored}


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def _serve(work: Path) -> dict:
    """Start the app with the fine-tuned model, send one product with its image, print the answer, stop."""
    import base64

    import requests

    from .common import ROOT, load_job_config
    from .serve import serving

    cfg = load_job_config("serve", ROOT / "configs" / "serve-world.yaml", [f"model.path={work / 'model'}"])
    cfg.http.port = _free_port(cfg.http.port)
    records = [json.loads(line) for line in (work / "catalog" / "records.jsonl").read_text().splitlines()]
    single = [r for r in records if r["split"] == "test" and len(json.loads(r["images"])) == 1]
    rec = next((r for r in single if r["task"] == "category_classification"), single[0])  # a picture decides CC
    image = Path(json.loads(rec["images"])[0])
    body = {k: rec[k] for k in ("id", "task", "instruction", "input", "options")}
    body["images"] = ["data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()]
    body["image_errors"] = "skip"  # the catalog breaks some images on purpose
    with serving(cfg) as url:
        r = requests.post(f"{url}/v1/predict", json=body, timeout=120)
        r.raise_for_status()
        out = r.json()
    img = out["images"][0]
    headline = (
        f"served at {url}: POST /v1/predict {rec['task']} {rec['id']} -> answer {out['answer']!r} "
        f"(gold {rec['output']!r}); caption kept: {img['kept']} (votes {img['votes']}); "
        f"{out['timings_ms']['total']:.0f} ms"
    )
    return _section(
        None,
        "configs/serve-world.yaml",
        f"caslie serve configs/serve-world.yaml --set model.path={work / 'model'}",
        {
            "served_at": url,
            "request": f"{rec['task']} {rec['id']}",
            "answer": out["answer"],
            "gold": rec["output"],
            "valid": out["valid"],
            "status": out["status"],
            "caption_kept": img["kept"],
            "votes": img["votes"],
            "timings_ms": out["timings_ms"],
        },
        model=work / "model" / "adapter",
        headline=headline,
    )
