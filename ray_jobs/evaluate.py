"""`caslie evaluate`: batch inference on the IND/OOD test splits on Ray Data, per-task metrics, ablations, table, chart.

Driver: resolve the model (training output, adapter, or a plain model), the data (enrichment output
or raw records), build one prompt per (record, ablation), run them through an actor pool of
`Predictor`s (batched greedy generation, GPUs from config), write predictions per ablation, score
them with `caslie_core.metrics`, and write the paper-layout table (Markdown, JSON) and a PNG chart.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

from caslie_core.config import write_resolved
from caslie_core.errors import CaslieError, ConfigError
from caslie_core.jobconfigs import EvaluateConfig

from .common import configure_data_context, init_ray, job_main, to_table

PROMPTS = {
    "id": pa.string(),
    "task": pa.string(),
    "split": pa.string(),
    "variant": pa.string(),
    "prompt": pa.string(),
    "reference": pa.string(),
    "skip": pa.string(),
}
ANSWERED = {
    **{k: v for k, v in PROMPTS.items() if k != "prompt"},
    "raw": pa.string(),
    "error": pa.string(),
    "n_prompt_tokens": pa.int32(),
    "n_new_tokens": pa.int32(),
}
READ_COLUMNS = [
    "id",
    "task",
    "split",
    "status",
    "instruction",
    "input",
    "options",
    "output",
    "images",
    "original_input",
    "original_options",
    "image_results",
]


# ------------------------------------------------------------------------------------------ model


def resolve_model(cfg: EvaluateConfig) -> dict:
    from caslie_core.predict import resolve_model_source

    return resolve_model_source(cfg.model)


class PredictActor:
    """One model copy (base + merged adapter) answering prompt batches."""

    def __init__(self, spec: dict) -> None:
        from caslie_core.predict import Predictor, local_copy

        self.predictor = Predictor(
            spec["base"],
            adapter=local_copy(spec["adapter"]),
            revision=spec["revision"],
            dtype=spec["dtype"],
            max_new_tokens=spec["max_new_tokens"],
            batch_size=spec["micro_batch"],
            max_prompt_tokens=spec["max_prompt_tokens"],
            trust_remote_code=spec["trust_remote_code"],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["prompt"]]
        answers = self.predictor.answer([rows[i]["prompt"] for i in todo])
        for r in rows:
            r.update({"raw": None, "error": None, "n_prompt_tokens": 0, "n_new_tokens": 0})
        for i, a in zip(todo, answers):
            rows[i].update(
                {"raw": a.text, "error": a.error, "n_prompt_tokens": a.n_prompt_tokens, "n_new_tokens": a.n_new_tokens}
            )
        return to_table(rows, ANSWERED)


# ------------------------------------------------------------------------------------------- data


def prepare_batch(
    batch: pa.Table, *, variants: list[str], style: str, splits: list[str], task_names: list[str] | None
) -> pa.Table:
    """Rows -> one prompt row per (record, ablation) in the wanted splits and tasks.

    Rows that failed enrichment (no task or text) come out with `skip` set, so they are counted."""
    from caslie_core.evaluation import variant_prompt
    from caslie_core.records import normalise_split
    from caslie_core.tasks import get_task

    out = []
    for row in batch.to_pylist():
        try:
            split = normalise_split(row.get("split"))
        except ValueError:
            split = None
        status = row.get("status") or "ok"
        if status == "failed":
            if split in splits or split is None:
                out.append(
                    {
                        "id": row.get("id"),
                        "task": row.get("task"),
                        "split": split,
                        "variant": None,
                        "prompt": None,
                        "reference": None,
                        "skip": "failed in enrichment",
                    }
                )
            continue
        if split not in splits:
            continue
        task = get_task(row["task"]).name
        if task_names and task not in task_names:
            continue
        for variant in variants:
            out.append(
                {
                    "id": row["id"],
                    "task": task,
                    "split": split,
                    "variant": variant,
                    "prompt": variant_prompt(row, variant, style=style),
                    "reference": row.get("output"),
                    "skip": None,
                }
            )
    return to_table(out, PROMPTS)


def precheck(cfg: EvaluateConfig) -> dict:
    from caslie_core.records import load_records, normalise_split
    from caslie_core.tasks import get_task

    from .train import resolve_data

    problems = []
    enriched, record_files, data_problems = resolve_data(cfg.data.path)
    problems += data_problems
    splits = []
    for s in cfg.data.splits:
        try:
            splits.append(normalise_split(s))
        except ValueError as e:
            problems.append(f"data.splits: {e}")
    try:
        task_names = [get_task(t).name for t in cfg.data.tasks] if cfg.data.tasks else None
    except KeyError as e:
        problems.append(f"data.tasks: {e.args[0]}")
        task_names = None
    record_rows = []
    if record_files and not data_problems:
        loaded = load_records(record_files, mode="collect")
        record_rows = [r.to_row() for r in loaded.records]
    if record_rows and set(cfg.ablations) - {"none"}:
        problems.append(
            f"ablations: {sorted(set(cfg.ablations) - {'none'})} need captions, but {record_files} "
            "are raw records; evaluate the enrichment output, or use ablations=[none]"
        )
    try:
        model = resolve_model(cfg)
    except ConfigError as e:
        problems += e.problems
        model = None
    if problems:
        raise ConfigError(problems)
    return {
        "enriched_files": enriched,
        "record_rows": record_rows,
        "splits": splits,
        "task_names": task_names,
        "model": model,
    }


def build_dataset(cfg: EvaluateConfig, pre: dict):
    import ray.data

    sources = []
    if pre["enriched_files"]:
        sources.append(ray.data.read_parquet(pre["enriched_files"], columns=READ_COLUMNS, partitioning=None))
    if pre["record_rows"]:
        sources.append(ray.data.from_items(pre["record_rows"]))
    ds = sources[0] if len(sources) == 1 else sources[0].union(*sources[1:])
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    ds = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=0.25,
        fn_kwargs={
            "variants": list(cfg.ablations),
            "style": pre["model"]["style"],
            "splits": pre["splits"],
            "task_names": pre["task_names"],
        },
    )
    m = pre["model"]
    spec = {
        **m,
        "dtype": cfg.model.dtype,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "micro_batch": cfg.generation.micro_batch,
        "max_prompt_tokens": cfg.generation.max_prompt_tokens,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    p = cfg.pool
    return ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={"spec": spec},
        batch_format="pyarrow",
        batch_size=p.batch_size,
        num_gpus=p.num_gpus or None,
        num_cpus=p.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=p.min_size, max_size=p.max_size),
    )


# ------------------------------------------------------------------------------------------ driver


def run(cfg: EvaluateConfig) -> dict:
    import fsspec

    from caslie_core.evaluation import (
        mark_valid,
        render_chart,
        results_table,
        score_predictions,
        table_markdown,
    )

    pre = precheck(cfg)
    started = init_ray(cfg.ray)
    t0 = time.time()
    try:
        configure_data_context(cfg.ray.progress_bars)
        out = cfg.output.path.rstrip("/")
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(root, exist_ok=True)
        write_resolved(cfg, out)
        rows, skipped = [], Counter()
        for batch in build_dataset(cfg, pre).iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                if r["skip"]:
                    skipped[r["skip"]] += 1
                else:
                    rows.append(r)
        wall = time.time() - t0
        if not rows:
            raise CaslieError(
                f"nothing to evaluate: no records in splits {pre['splits']}"
                f"{' for tasks ' + str(pre['task_names']) if pre['task_names'] else ''}"
            )
        mark_valid(rows)
        rows.sort(key=lambda r: (r["variant"], r["split"], r["task"], r["id"]))
        paths = {}
        for variant in cfg.ablations:
            paths[variant] = f"{out}/predictions-{variant}.jsonl"
            with fsspec.open(paths[variant], "wt", encoding="utf-8") as fh:
                for r in rows:
                    if r["variant"] == variant:
                        fh.write(
                            json.dumps(
                                {
                                    "id": r["id"],
                                    "task": r["task"],
                                    "split": r["split"],
                                    "prediction": r["raw"],
                                    "answer": r["answer"],
                                    "reference": r["reference"],
                                    "valid": r["valid"],
                                    "correct": r["correct"],
                                    "error": r["error"],
                                },
                                ensure_ascii=False,
                            )
                            + "\n"
                        )
        scores = score_predictions(rows)
        table = results_table(scores, paper_rows=list(cfg.output.paper_rows), variants=list(cfg.ablations))
        md = table_markdown(table)
        with tempfile.TemporaryDirectory() as tmp:
            chart = render_chart(
                table,
                str(Path(tmp) / "results.png"),
                title=f"{pre['model']['base']}{' + adapter' if pre['model']['adapter'] else ''}",
            )
            fs.put(str(Path(tmp) / "results.png"), root + "/results.png")
        summary = make_summary(cfg, rows, skipped, pre, wall, chart, paths, out)
        with fsspec.open(out + "/results.md", "wt") as fh:
            fh.write(md)
        with fsspec.open(out + "/results.json", "wt") as fh:
            json.dump({"table": table, "scores": scores}, fh, indent=2)
        with fsspec.open(out + "/summary.json", "wt") as fh:
            json.dump(summary, fh, indent=2)
        print(md)
        print(
            f"[evaluate] {summary['prompts']} prompts ({', '.join(cfg.ablations)}) in {summary['wall_seconds']} s, "
            f"{summary['prompts_per_second']} prompts/s; results in {out}"
        )
        return summary
    finally:
        if started:
            import ray

            ray.shutdown()


def make_summary(cfg, rows, skipped, pre, wall, chart, paths, out) -> dict:
    per = defaultdict(lambda: {"records": 0, "invalid": 0, "errors": 0})
    for r in rows:
        key = f"{r['variant']}/{r['split']}/{r['task']}"
        per[key]["records"] += 1
        per[key]["invalid"] += 0 if r["valid"] else 1
        per[key]["errors"] += 1 if r["error"] else 0
    new_tokens = sum(r["n_new_tokens"] or 0 for r in rows)
    return {
        "job": "evaluate",
        "model": pre["model"],
        "ablations": list(cfg.ablations),
        "splits": pre["splits"],
        "prompts": len(rows),
        "records": len({r["id"] for r in rows}),
        "not_evaluated": dict(skipped),
        "per_group": dict(sorted(per.items())),
        "invalid": sum(1 for r in rows if not r["valid"]),
        "generation_errors": sum(1 for r in rows if r["error"]),
        "wall_seconds": round(wall, 2),
        "prompts_per_second": round(len(rows) / wall, 2) if wall else None,
        "new_tokens_per_second": round(new_tokens / wall, 1) if wall else None,
        "predictions": paths,
        "results": {"json": out + "/results.json", "markdown": out + "/results.md", "chart": out + "/results.png"},
        "chart": chart,
    }


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", EvaluateConfig, run, __doc__, argv)


if __name__ == "__main__":
    import sys

    from ray_jobs.cli import run_job_module

    sys.exit(run_job_module("evaluate"))
