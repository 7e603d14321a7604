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

    for name, stage in (("enrich", _enrich), ("train", _train), ("evaluate", _evaluate), ("serve", _serve)):
        t = time.time()
        summary["stages"][name] = stage(work)
        summary["stages"][name]["seconds"] = round(time.time() - t, 2)

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


def _train(work: Path) -> dict:
    from caslie_core.config import load_config
    from caslie_core.jobconfigs import TrainConfig
    from ray_jobs import train
    from ray_jobs.common import ROOT

    cfg = load_config(TrainConfig, ROOT / "configs" / "train-demo.yaml", [
        f"data.path={work / 'enriched'}", f"run.storage_path={work / 'train-runs'}", f"output.path={work / 'model'}",
    ])
    s = train.run(cfg)
    curve = s["loss_curve"]
    losses = curve["loss"]
    marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1}) if losses else []
    print("[demo] loss curve: " + ", ".join(f"step {curve['steps'][i]}: {losses[i]:.3f}" for i in marks)
          + (f"; eval loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else ""))
    return {
        "adapter": s["adapter"], "steps": s["steps"], "train_rows": s["data"]["train_rows_used"],
        "skipped_failed": s["data"]["skipped_failed"], "loss_first": curve["first"], "loss_last": curve["last"],
        "eval_loss": s["eval_loss"], "tokens_per_s": s["tokens_per_s"], "run": s["storage"],
    }


def _evaluate(work: Path) -> dict:
    from caslie_core.config import load_config
    from caslie_core.jobconfigs import EvaluateConfig
    from ray_jobs import evaluate
    from ray_jobs.common import ROOT

    cfg = load_config(EvaluateConfig, ROOT / "configs" / "evaluate-demo.yaml", [
        f"model.path={work / 'model'}", f"data.path={work / 'enriched'}", f"output.path={work / 'evaluation'}",
    ])
    s = evaluate.run(cfg)  # prints the table
    return {"results": s["results"], "prompts": s["prompts"], "invalid": s["invalid"],
            "not_evaluated": s["not_evaluated"], "prompts_per_second": s["prompts_per_second"]}


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

    from caslie_core.config import load_config
    from caslie_core.jobconfigs import ServeConfig
    from ray_jobs.common import ROOT
    from ray_jobs.serve import serving

    cfg = load_config(ServeConfig, ROOT / "configs" / "serve-demo.yaml", [f"model.path={work / 'model'}"])
    cfg.http.port = _free_port(cfg.http.port)
    rec = next(r for r in map(json.loads, (work / "catalog" / "records.jsonl").read_text().splitlines())
               if r["split"] == "test" and len(json.loads(r["images"])) == 1)
    image = Path(json.loads(rec["images"])[0])
    body = {k: rec[k] for k in ("id", "task", "instruction", "input", "options")}
    body["images"] = ["data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()]
    body["image_errors"] = "skip"  # the catalog breaks some images on purpose
    with serving(cfg) as url:
        r = requests.post(f"{url}/v1/predict", json=body, timeout=120)
        r.raise_for_status()
        out = r.json()
    img = out["images"][0]
    print(f"[demo] served at {url}: POST /v1/predict {rec['task']} {rec['id']} -> answer {out['answer']!r} "
          f"(gold {rec['output']!r}); caption kept: {img['kept']} (votes {img['votes']}); "
          f"{out['timings_ms']['total']:.0f} ms")
    return {"url": url, "request": {"id": rec["id"], "task": rec["task"]}, "answer": out["answer"],
            "gold": rec["output"], "valid": out["valid"], "status": out["status"], "caption_kept": img["kept"],
            "votes": img["votes"], "timings_ms": out["timings_ms"], "config": "configs/serve-demo.yaml"}
