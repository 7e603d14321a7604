"""What is decided before any training worker starts (`TrainPlan`): the inputs found and counted, the
config checked against the model and the data, the run name and the step budget.

Every problem found is reported at once in one `ConfigError`, so a typo costs seconds, not a cluster.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError
from ..io.store import load_inputs
from ..records import split_or_none
from ..tasks import wanted_tasks as task_names
from .data import TRAINABLE_STATUSES, prompt_style, wanted_task
from .lora import model_problems
from .recipe import steps_per_epoch


@dataclass
class SplitCounts:
    """Rows of one split by enrichment status; `usable` = the statuses that train (ok, partial)."""

    ok: int = 0
    partial: int = 0
    failed: int = 0

    @property
    def usable(self) -> int:
        return sum(getattr(self, s) for s in TRAINABLE_STATUSES)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "partial": self.partial, "failed": self.failed, "usable": self.usable}


@dataclass
class TrainPlan:
    """The typed result of `plan_training`: what the driver builds its datasets and trainer from."""

    enriched_files: list[str]
    record_rows: list[dict]
    rejected_records: int
    train_split: str
    eval_split: str
    task_names: list[str] | None
    train: SplitCounts
    eval: SplitCounts
    n_train: int
    style: str
    run_name: str
    storage: str
    steps_per_epoch: int
    total_steps: int
    record_files: list[str] = field(default_factory=list)


def count_rows(enriched: list[str], record_rows: list[dict]) -> Counter:
    """Rows by (split, status, task), read from three columns (cheap at catalog scale)."""
    import fsspec
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in enriched:
        with fsspec.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["status", "split", "task"])
        for status, split, task in zip(*(t.column(c).to_pylist() for c in ("status", "split", "task"))):
            counts[(split_or_none(split) or str(split), status, task)] += 1
    for row in record_rows:
        counts[(split_or_none(row["split"]) or str(row["split"]), "ok", row["task"])] += 1
    return counts


def split_counts(counts: Counter, split: str, names: list[str] | None) -> SplitCounts:
    out = SplitCounts()
    for (sp, status, task), n in counts.items():
        if sp == split and wanted_task(task, names) and status in ("ok", "partial", "failed"):
            setattr(out, status, getattr(out, status) + n)
    return out


def run_name(cfg: TrainConfig) -> str:
    """Default run name: same input/model/LoRA/optimizer settings -> same name -> resume."""
    if cfg.run.name:
        return cfg.run.name
    dump = cfg.model_dump(mode="json")
    key = {k: v for k, v in dump.items() if k in ("model", "data", "lora", "optim")}
    key["data"] = {**key["data"], "path": dump["input"]["path"]}  # as before input.path: old runs keep their name
    return "caslie-train-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def absolute_storage(path: str) -> str:
    """Ray Train workers chdir into the run folder: a local storage path must be absolute."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def plan_training(cfg: TrainConfig) -> TrainPlan:
    """Everything that can be checked before a worker starts; raises ConfigError listing what to fix."""
    problems: list[str] = []
    inputs = load_inputs(cfg.input.path, key="input.path")
    problems += inputs.problems
    record_rows, rejected = inputs.record_rows, inputs.rejected
    train_split = split_or_none(cfg.data.train_split)
    eval_split = split_or_none(cfg.data.eval_split)
    if train_split is None:
        problems.append(f"data.train_split: unknown split {cfg.data.train_split!r}")
    if eval_split is None:
        problems.append(f"data.eval_split: unknown split {cfg.data.eval_split!r}")
    try:
        names = task_names(cfg.data.tasks)
    except KeyError as e:
        problems.append(f"data.tasks: {e.args[0]}")
        names = None
    problems += model_problems(cfg.model, cfg.lora)
    if problems:
        raise ConfigError(problems)
    counts = count_rows(inputs.enriched, record_rows)
    train = split_counts(counts, train_split, names)
    evals = split_counts(counts, eval_split, names)
    by_split: Counter = Counter()
    for (sp, _, _), n in counts.items():
        by_split[sp] += n
    if train.usable == 0:
        problems.append(
            f"data.train_split: no usable rows in split {train_split!r} (statuses ok/partial"
            f"{', tasks ' + str(names) if names else ''}); rows per split: {dict(by_split) or 'none'}"
        )
    if cfg.eval.enabled and evals.usable == 0:
        problems.append(
            f"data.eval_split: no usable rows in split {eval_split!r}; rows per split: "
            f"{dict(by_split) or 'none'} (or set eval.enabled=false)"
        )
    if problems:
        raise ConfigError(problems)
    n_train = min(train.usable, cfg.data.limit) if cfg.data.limit else train.usable
    if n_train < cfg.scaling.num_workers:
        raise ConfigError([f"scaling.num_workers: {cfg.scaling.num_workers} workers but only {n_train} training rows"])
    per_epoch = steps_per_epoch(
        n_train, num_workers=cfg.scaling.num_workers, batch_size=cfg.optim.batch_size, grad_accum=cfg.optim.grad_accum
    )
    total = per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    return TrainPlan(
        enriched_files=inputs.enriched,
        record_files=inputs.records,
        record_rows=record_rows,
        rejected_records=rejected,
        train_split=train_split,
        eval_split=eval_split,
        task_names=names,
        train=train,
        eval=evals,
        n_train=n_train,
        style=prompt_style(cfg.model.model, cfg.model.prompt_style),
        run_name=run_name(cfg),
        storage=absolute_storage(cfg.run.storage_path),
        steps_per_epoch=per_epoch,
        total_steps=total,
    )
