"""`caslie evaluate`: batch inference on the IND/OOD test splits on Ray Data, per-task metrics, ablations, table, chart.

    caslie evaluate configs/evaluate-demo.yaml --set model.path=demo-out/model --set input.path=demo-out/enriched

Recipe: plan (model, inputs, splits; before any actor starts) -> connect -> one prompt per (record,
ablation) -> an actor pool of `Predictor`s (batched greedy generation, GPUs from config) -> scored
predictions, the paper-layout table and a chart under `output.path` (`caslie_core.evaluation.report`).
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa

from caslie_core.config import EvaluateConfig, GenerationConfig, write_resolved
from caslie_core.errors import CaslieError
from caslie_core.evaluation.ablations import prompt_rows
from caslie_core.evaluation.plan import EvalPlan, plan_evaluation
from caslie_core.evaluation.report import write_report
from caslie_core.io.store import EVAL_COLUMNS

from .capacity import actor_resources, wait_for_pools
from .common import configure_data_context, init_ray, job_entry, job_main, log, read_inputs, shutdown, to_table

PROMPTS = {
    "id": pa.string(),
    "task": pa.string(),
    "split": pa.string(),
    "variant": pa.string(),
    "prompt": pa.string(),
    "reference": pa.string(),
    "skip": pa.string(),
}
ANSWERED = {  # the prompt stays: predictions files show exactly what the model was given
    **PROMPTS,
    "raw": pa.string(),
    "error": pa.string(),
    "n_prompt_tokens": pa.int32(),
    "n_new_tokens": pa.int32(),
}


def prepare_batch(batch: pa.Table, **kwargs) -> pa.Table:
    return to_table(prompt_rows(batch.to_pylist(), **kwargs), PROMPTS)


class PredictActor:
    """One model copy (base + merged adapter) answering prompt batches."""

    def __init__(self, source: dict, generation: dict, model: dict) -> None:
        from caslie_core.config.evaluate import EvalModelConfig
        from caslie_core.models.predictor import Predictor, local_copy

        gen, m = GenerationConfig.model_validate(generation), EvalModelConfig.model_validate(model)
        self.predictor = Predictor(
            source["base"],
            adapter=local_copy(source["adapter"]),
            revision=source["revision"],
            dtype=m.dtype,
            max_new_tokens=gen.max_new_tokens,
            batch_size=gen.micro_batch,
            max_prompt_tokens=gen.max_prompt_tokens,
            trust_remote_code=m.trust_remote_code,
            style=source["style"],
            prefix_cache=gen.prefix_cache,
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


def build_dataset(cfg: EvaluateConfig, plan: EvalPlan):
    import ray.data

    ds = read_inputs(plan.enriched_files, plan.record_rows, EVAL_COLUMNS)
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    ds = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=0.25,
        fn_kwargs={
            "variants": list(cfg.ablations),
            "style": plan.model.style,
            "splits": plan.splits,
            "task_names": plan.task_names,
        },
    )
    p = cfg.pool
    return ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "source": plan.model.as_dict(),
            "generation": cfg.generation.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
        },
        batch_format="pyarrow",
        batch_size=p.batch_size,
        num_gpus=p.num_gpus or None,
        num_cpus=p.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=p.min_size, max_size=p.max_size),
    )


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate; return the summary (also written to `output.path/summary.json`)."""
    import fsspec

    plan = plan_evaluation(cfg)
    started = init_ray(cfg.ray)
    t0 = time.time()
    try:
        configure_data_context(cfg.ray.progress_bars)
        fs, root = fsspec.core.url_to_fs(cfg.output.path)
        fs.makedirs(root, exist_ok=True)
        write_resolved(cfg, cfg.output.path)
        wait_for_pools([("pool", actor_resources(cfg.pool), cfg.pool.start_timeout_s)], can_grow=not started)
        rows, skipped = [], Counter()
        for batch in build_dataset(cfg, plan).iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                if r["skip"]:
                    skipped[r["skip"]] += 1
                else:
                    rows.append(r)
        if not rows:
            tasks = f" for tasks {plan.task_names}" if plan.task_names else ""
            raise CaslieError(f"nothing to evaluate: no records in splits {plan.splits}{tasks}")
        summary = write_report(cfg, plan, rows, dict(skipped), time.time() - t0)
        log.info(summary.pop("markdown"))
        log.info(
            f"[evaluate] {summary['prompts']} prompts ({', '.join(cfg.ablations)}) in {summary['wall_seconds']} s, "
            f"{summary['prompts_per_second']} prompts/s; results in {cfg.output.path}"
        )
        return summary
    finally:
        if started:
            shutdown(started)


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("evaluate"))
