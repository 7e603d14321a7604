"""The `caslie` command. Each subcommand imports what it needs when it runs, so `--help` is fast."""

from __future__ import annotations

import argparse
import functools
import json
import sys

from . import store_cli
from .common import add_job_arguments, load_job_config, quiet, run_guarded


def _add_job(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return add_job_arguments(sub.add_parser(name, help=help_text, description=help_text), positional=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caslie",
        description="CASLIE on Ray: caption, judge, enrich, fine-tune, evaluate and serve e-commerce models.",
    )
    parser.add_argument("--version", action="version", version=f"caslie {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on its embedded default (tiny models, synthetic catalog)",
        description="Run every stage that exists on the embedded default, offline.",
    )
    p.add_argument("--workdir", default="demo-out", help="folder for all demo outputs (default: demo-out)")
    p.add_argument("--records", type=int, default=1050, help="synthetic records to generate (default: 1050)")
    p.add_argument("--seed", type=int, default=0, help="the synthetic world's seed (another seed, another world)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs on the terminal")

    _add_job(sub, "enrich", "caption every image, let the judges vote, write enriched records (Ray Data)")
    _add_job(sub, "evaluate", "answer the test splits (Ray Data), score per task, table + chart, ablations")
    _add_job(sub, "train", "LoRA fine-tune a causal LM on enriched records (Ray Train); writes a PEFT adapter")
    _add_job(sub, "serve", "serve captioner, judges and the fine-tuned model over HTTP (Ray Serve) until Ctrl-C")

    p = sub.add_parser(
        "submit",
        help="submit a job to a Ray cluster (Ray Jobs API; token auth from the environment or ~/.ray/auth_token)",
        description="Validate CONFIG, then submit `python -m "
        "ray_jobs.JOB --config CONFIG` with cluster/runtime_env.yaml and this repo as working dir.",
    )
    p.add_argument("job", choices=["enrich", "train", "evaluate"])
    p.add_argument("config", help="YAML config (path inside this repo, uploaded with it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--address",
        default=None,
        help="Jobs API URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the end; exit 1 unless it SUCCEEDED")
    p.add_argument("--runtime-env", default=None, help="runtime env YAML (default: cluster/runtime_env.yaml)")
    p.add_argument("--no-upload", action="store_true", help="do not upload this repo (the image has the code)")

    p = sub.add_parser(
        "tiny-models",
        help="build the tiny offline models (tokenizer, LLaVA captioner, Llama LM; the trained world captioner and judge)",
        description="Build the tiny offline models under DIR.",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "synth",
        help="write a synthetic MMECInstruct-schema catalog with images",
        description="Write records.jsonl, records.parquet and images/ under DIR.",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--records", type=int, required=True, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=None, help="comma-separated task abbreviations (default: all 7)")
    p.add_argument("--broken-images", type=int, default=0, help="how many images to break on purpose")
    p.add_argument("--base-url", default=None, help="URL prefix for images instead of local paths")
    p.add_argument(
        "--catalog",
        choices=["v2", "v1"],
        default="v2",
        help="v2: labels of CC/MPC/PSI live in the pictures (the demo's world); v1: every label in the text",
    )

    p = sub.add_parser(
        "validate",
        help="validate a records file and print counts and rejects",
        description="Validate MMECInstruct-schema records (JSONL, JSON list or Parquet; any fsspec URL).",
    )
    p.add_argument("records", help="records file, folder (read by the job's folder rule) or URL")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")

    p = sub.add_parser(
        "score",
        help="score predictions per split and task (research, strict and invalid figures)",
        description="Print one JSON object {split: {task abbreviation: {primary, score, strict_score, invalid, n}}}, "
        "each split (train, val, test, ood_test) scored apart, as the paper reports the in-domain test (test) "
        "and the out-of-domain test (ood_test); records without a split go under `unsplit`.",
    )
    p.add_argument("records", help="records with gold outputs (JSONL, JSON or Parquet)")
    p.add_argument("predictions", help="JSON list of strings aligned with RECORDS, or JSONL of {id, prediction}")
    p.add_argument("--split", default=None, help="score only this split (train, val, test, ood_test)")
    p.add_argument(
        "--pooled",
        action="store_true",
        help="score all rows (of --split if given) together, splits mixed, as {task: {...}}; "
        "not the paper's figure (the paper reports splits apart)",
    )
    p.add_argument("--details", action="store_true", help="include companion metrics")
    p = sub.add_parser(
        "prompts",
        help="print exactly what a model is given for each record (JSONL {id, prompt})",
        description="Render each record's instruction prompt as a model sees it before tokenization: captions "
        "written into the input (uniM3), the template of the model (alpaca or mistral, CASLIE_METHOD.md 2.4). "
        "RECORDS: raw records (their captions from caption_info) or enrichment output (its captions and votes). "
        "No model is downloaded.",
    )
    p.add_argument("records", help="raw records (JSONL, JSON, Parquet; any fsspec URL) or an enrichment output folder")
    style = p.add_mutually_exclusive_group()
    style.add_argument("--model", default=None, help="model id or path: its template (NingLab/CASLIE-M: mistral)")
    style.add_argument("--style", choices=("alpaca", "mistral"), default=None, help="the template (default alpaca)")
    p.add_argument(
        "--captions",
        choices=("kept", "all", "none"),
        default="kept",
        help="kept: the judges' decisions (enrichment output only); all: every caption; none: each rendered as "
        "rejected (default: kept)",
    )
    store_cli.add_parser(sub)
    return parser


def _cmd_tiny_models(args) -> int:
    from caslie_core.models.tiny import build_tiny_models
    from caslie_core.world.models import build_world_models

    paths = build_tiny_models(args.dir, seed=args.seed)  # the trained world models next to the random ones
    print(json.dumps({**paths, **build_world_models(f"{args.dir}/world", seed=args.seed, tiny=paths)}, indent=2))
    return 0


def _cmd_synth(args) -> int:
    from caslie_core.synthetic import write_catalog
    from caslie_core.world.catalog import write_world_catalog

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    write = write_world_catalog if args.catalog == "v2" else write_catalog
    manifest = write(
        args.dir, args.records, seed=args.seed, tasks=tasks, broken_images=args.broken_images, base_url=args.base_url
    )
    manifest.pop("rules", None), manifest.pop("true_captions", None)  # both are in manifest.json
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_validate(args) -> int:
    from collections import Counter

    from caslie_core.io.sources import load_records

    result = load_records(args.records, mode="strict" if args.strict else "collect")
    by_task = Counter(r.spec.abbr for r in result.records)
    print(
        json.dumps(
            {
                "rows": result.total,
                "valid": len(result.records),
                "rejected": len(result.rejects),
                "valid_per_task": dict(by_task),
                "rejects": [r.__dict__ for r in result.rejects[:50]],
            },
            indent=2,
        )
    )
    return 0 if not result.rejects else 1


def _cmd_score(args) -> int:
    from caslie_core.evaluation.metrics import load_predictions, score_by_split, score_records
    from caslie_core.io.sources import load_records
    from caslie_core.records import normalise_split

    records = load_records(args.records, mode="strict").records
    preds = load_predictions(args.predictions, records)
    split = normalise_split(args.split) if args.split else None
    if split:
        pairs = [(r, p) for r, p in zip(records, preds) if r.split == split]
        records, preds = [r for r, _ in pairs], [p for _, p in pairs]
    if args.pooled:  # today's flat {task: ...}: every row (of --split) together, splits mixed
        scores = score_records(records, preds)
        per_task = list(scores.values())
    else:  # {split: {task: ...}}, each split scored apart
        scores = score_by_split(records, preds, splits=[split] if split else None)
        per_task = [s for tasks in scores.values() for s in tasks.values()]
    if not args.details:
        for s in per_task:
            s.pop("companions")
    print(json.dumps(scores, indent=2))
    return 0


def _cmd_prompts(args) -> int:
    from caslie_core.prompts import default_style_for
    from caslie_core.render import prompt_lines

    style = args.style or (default_style_for(args.model) if args.model else "alpaca")
    failed = 0
    for line in prompt_lines(args.records, style=style, captions=args.captions):
        failed += line["prompt"] is None
        print(json.dumps(line, ensure_ascii=False))
    if failed:
        print(f"{failed} record(s) could not be rendered (see their error)", file=sys.stderr)
    return 1 if failed else 0


def _run_job(name: str, args) -> int:
    """A config-driven job: validate CONFIG (+ --set overrides) with its model, then run it."""
    import importlib

    quiet(args.verbose)
    importlib.import_module(f"ray_jobs.{name}").run(load_job_config(name, args.config, args.overrides))
    return 0


def _cmd_submit(args) -> int:
    from .submit import submit

    res = submit(
        args.job,
        args.config,
        args.overrides,
        address=args.address,
        wait=args.wait,
        runtime_env_path=args.runtime_env,
        upload=not args.no_upload,
    )
    return 0 if not args.wait or res["status"] == "SUCCEEDED" else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    quiet(args.verbose)
    run_demo(args.workdir, records=args.records, seed=args.seed)
    return 0


COMMANDS = {
    "tiny-models": _cmd_tiny_models,
    "synth": _cmd_synth,
    "validate": _cmd_validate,
    "score": _cmd_score,
    "prompts": _cmd_prompts,
    "demo": _cmd_demo,
    **{job: functools.partial(_run_job, job) for job in ("enrich", "train", "evaluate", "serve")},
    "submit": _cmd_submit,
    "store": store_cli.command,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("caslie")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.command, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
