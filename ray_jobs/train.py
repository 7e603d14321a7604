"""`caslie train`: LoRA fine-tuning on Ray Train (TorchTrainer), enriched data in, a PEFT adapter out.

    caslie train configs/train-demo.yaml --set input.path=demo-out/enriched --set output.path=/tmp/model
    python -m ray_jobs.train --config configs/train-demo.yaml   # the RayJob entrypoint

Recipe: plan (inputs counted, config checked against the model and the data, before any worker starts)
-> connect -> Ray Data pipelines that filter and tokenize -> TorchTrainer whose workers run
`caslie_core.training.recipe.LoRARecipe` -> copy the final adapter and write the summary.
Rerunning with the same run name resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time

from caslie_core.config import TrainConfig, config_hash
from caslie_core.errors import CaslieError
from caslie_core.io.store import EVAL_COLUMNS
from caslie_core.training.data import tokenize_batch
from caslie_core.training.outputs import existing_checkpoints, train_summary, write_outputs
from caslie_core.training.plan import TrainPlan, plan_training

from . import counters, metrics
from .common import configure_data_context, init_ray, job_entry, job_main, log, read_inputs, shutdown


def build_datasets(cfg: TrainConfig, plan: TrainPlan) -> dict:
    """`train` (and `val`) datasets of tokenized rows, from enrichment parts and/or raw records."""
    rows = [{**r, "status": "ok"} for r in plan.record_rows]
    base = read_inputs(plan.enriched_files, rows, EVAL_COLUMNS)
    kwargs = dict(
        tokenizer=cfg.model.model,
        style=plan.style,
        captions=cfg.data.captions,
        max_length=cfg.data.max_length,
        task_names=plan.task_names,
    )
    out = {}
    for name, split in (("train", plan.train_split), ("val", plan.eval_split)):
        if name == "val" and not cfg.eval.enabled:
            continue
        ds = base.map_batches(
            tokenize_batch, batch_format="pyarrow", batch_size=256, num_cpus=0.25, fn_kwargs={**kwargs, "split": split}
        )
        if name == "train" and cfg.data.limit:
            ds = ds.limit(cfg.data.limit)
        out[name] = ds.materialize() if cfg.data.materialize else ds
    return out


def _step_metrics(m: dict, steps: counters.Counts) -> None:
    """Each step into Ray's metrics: steps and loss once (rank 0), tokens/s per worker."""
    if m["rank"] == 0:
        steps.add("caslie_train_steps_total")
        metrics.set_gauge("caslie_train_loss", m["train_loss"])
    if m.get("tokens_per_s"):
        metrics.set_gauge("caslie_train_tokens_per_second", m["tokens_per_s"])


def train_loop_per_worker(c: dict) -> None:
    """One Ray Train worker: the core recipe fed with this worker's shards, reporting through Ray Train."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from caslie_core.training.recipe import LoRARecipe

    cfg = TrainConfig.model_validate(c["config"])  # re-validated on arrival
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives (the node-id gather) use the current device

    def report(metrics: dict, folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    rank = ctx.get_world_rank()  # rank 0 counts the steps, from zero when the worker starts (`metrics.Counts`)
    steps = counters.Counts({"caslie_train_steps_total": [{}]} if rank == 0 else None)
    recipe = LoRARecipe(
        cfg,
        total_steps=c["total_steps"],
        report=report,
        rank=rank,
        world=ctx.get_world_size(),
        device=device,
        node_id=ray.get_runtime_context().get_node_id(),
        wrap_ddp=ray.train.torch.prepare_model,
        progress_dir=c["progress_dir"],
        config_hash=c["config_hash"],
        on_step=functools.partial(_step_metrics, steps=steps),
    )
    recipe.setup()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
        recipe.load_checkpoint(folder)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("val") if cfg.eval.enabled else None
    bs, buffer, seed = cfg.optim.batch_size, cfg.data.shuffle_buffer, cfg.optim.seed
    recipe.train(
        lambda epoch: train_shard.iter_batches(
            batch_size=bs,
            batch_format="numpy",
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(seed + epoch) if buffer else None,
        ),
        (lambda: eval_shard.iter_batches(batch_size=bs, batch_format="numpy")) if eval_shard else None,
    )
    recipe.cleanup()
    steps.flush()


def run(cfg: TrainConfig) -> dict:
    """Train; return the summary (also written to `output.path/summary.json`)."""
    import fsspec
    import ray.train
    from ray.train.torch import TorchTrainer

    plan = plan_training(cfg)  # before any worker starts
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # a cloud-metadata poller we do not use
    started = init_ray(cfg.ray)
    t0 = time.time()
    try:
        configure_data_context(cfg.ray.progress_bars)
        run_dir = f"{plan.storage}/{plan.run_name}"
        chash = config_hash(cfg)
        resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "total_steps": plan.total_steps,
                "progress_dir": f"{run_dir}/progress",  # any storage: local, s3://, ...
                "config_hash": chash,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker=resources,
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=plan.run_name,
                storage_path=plan.storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            ),
            datasets=build_datasets(cfg, plan),
        )
        existing = existing_checkpoints(run_dir)
        if existing:
            log.info(f"[train] run {plan.run_name} has {existing} checkpoint(s): resuming from the latest")
        log.info(
            f"[train] run {plan.run_name}: {plan.n_train} training rows on {cfg.scaling.num_workers} worker(s), "
            f"{plan.total_steps} steps; checkpoints under {run_dir}"
        )
        result = trainer.fit()
        if result.error:
            raise CaslieError(f"training failed: {result.error}")
        if result.checkpoint is None:
            raise CaslieError("training finished without a checkpoint")
        with tempfile.TemporaryDirectory(prefix="caslie-final-") as tmp:
            result.checkpoint.to_directory(tmp)
            state, merged = write_outputs(cfg, tmp)
        summary = train_summary(
            cfg, plan, state, checkpoint=result.checkpoint.path, merged=merged, wall=time.time() - t0, chash=chash
        )
        summary["resumed_existing_run"] = bool(existing)
        with fsspec.open(cfg.output.path.rstrip("/") + "/summary.json", "wt") as fh:
            json.dump(summary, fh, indent=2)
        curve = summary["loss_curve"]
        ev = "" if summary["eval_loss"] is None else f", eval loss {summary['eval_loss']:.3f}"
        log.info(
            f"[train] {summary['steps']} steps, train loss {curve['first']:.3f} -> {curve['last']:.3f}{ev}, "
            f"{summary['tokens_per_s'] or 0:.0f} tokens/s; adapter {summary['adapter']}"
        )
        return summary
    finally:
        if started:
            shutdown(started)


def main(argv: list[str] | None = None) -> int:
    return job_main("train", run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(job_entry("train"))
