"""After training: the final adapter (its tokenizer, optionally the merged model) copied to `output.path`,
and the run's summary built from the final checkpoint's state and the plan."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import TrainConfig, write_resolved
from .lora import merge_adapter
from .plan import TrainPlan
from .recipe import STATE_FILE


def existing_checkpoints(run_dir: str) -> int:
    """Checkpoints a run folder already holds (a rerun with the same name resumes from the latest)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_dir)
    try:
        return sum(1 for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_"))
    except FileNotFoundError:
        return 0


def write_outputs(cfg: TrainConfig, checkpoint_dir: str) -> tuple[dict, str | None]:
    """Copy the adapter of a local checkpoint folder to output.path (and merge when asked).

    Returns (the checkpoint's training state, the merged model's path or None)."""
    import tempfile

    import fsspec

    out = cfg.output.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    write_resolved(cfg, out)
    state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    adapter_local = Path(checkpoint_dir) / "adapter"
    fs.put(str(adapter_local), root.rstrip("/") + "/adapter", recursive=True)
    merged = None
    if cfg.output.merge:
        merged = out + "/merged"
        with tempfile.TemporaryDirectory(prefix="caslie-merge-") as tmp:
            merge_adapter(cfg.model, str(adapter_local), Path(tmp) / "merged")
            fs.put(str(Path(tmp) / "merged"), root.rstrip("/") + "/merged", recursive=True)
    return state, merged


def train_summary(
    cfg: TrainConfig, plan: TrainPlan, state: dict, *, checkpoint: str, merged: str | None, wall: float, chash: str
) -> dict:
    """The `summary.json` of a training run: steps, data counts, loss curve, throughput, attempts."""
    out = cfg.output.path.rstrip("/")
    history = state["history"]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 10)
    evals = state.get("evals", [])
    return {
        "job": "train",
        "run_name": plan.run_name,
        "storage": f"{plan.storage}/{plan.run_name}",
        "checkpoint": checkpoint,
        "adapter": out + "/adapter",
        "merged": merged,
        "model": cfg.model.model,
        "prompt_style": plan.style,
        "steps": state["step"],
        "planned_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "epoch": state["epoch"],
        "workers": cfg.scaling.num_workers,
        "effective_batch": cfg.optim.batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers,
        "data": {
            "train": plan.train.as_dict(),
            "eval": plan.eval.as_dict(),
            "train_rows_used": plan.n_train,
            "skipped_failed": plan.train.failed + plan.eval.failed,
            "rejected_records": plan.rejected_records,
            "truncated_train_examples": state["truncated"],
            "max_length": cfg.data.max_length,
        },
        "tokens": state["tokens"],
        "tokens_per_s": state.get("tokens_per_s"),
        "loss_curve": {
            "first": sum(losses[:window]) / window if losses else None,
            "last": sum(losses[-window:]) / window if losses else None,
            "steps": [h["step"] for h in history],
            "loss": [round(x, 5) for x in losses],
        },
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_curve": evals,
        "attempts": state["attempts"],
        "restarts": len(state["attempts"]) - 1,
        "wall_seconds": round(wall, 2),
        "config_hash": chash,
    }
