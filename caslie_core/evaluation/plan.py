"""What is decided before any evaluation actor starts (`EvalPlan`): the model to load, the inputs, the
splits and tasks. Every problem is reported at once in one `ConfigError`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EvaluateConfig
from ..errors import ConfigError
from ..io.store import load_inputs
from ..models.predictor import ModelSource, resolve_model_source
from ..records import normalise_split
from ..tasks import wanted_tasks as names_of


@dataclass
class EvalPlan:
    enriched_files: list[str]
    record_rows: list[dict]
    splits: list[str]
    task_names: list[str] | None
    model: ModelSource


def plan_evaluation(cfg: EvaluateConfig) -> EvalPlan:
    """Everything that can be checked before an actor starts; raises ConfigError listing what to fix."""
    problems = []
    inputs = load_inputs(cfg.input.path, key="input.path")
    problems += inputs.problems
    splits = []
    for s in cfg.data.splits:
        try:
            splits.append(normalise_split(s))
        except ValueError as e:
            problems.append(f"data.splits: {e}")
    try:
        task_names = names_of(cfg.data.tasks)
    except KeyError as e:
        problems.append(f"data.tasks: {e.args[0]}")
        task_names = None
    record_rows = inputs.record_rows
    if record_rows and "kept" in cfg.ablations:
        problems.append(
            f"ablations: 'kept' needs the judges' votes, but {inputs.records} are raw records (their "
            "caption_info has captions, no votes); evaluate the enrichment output (caslie enrich, "
            "captioner.source: record judges released captions), or use ablations [all] or [none]"
        )
    model = None
    try:
        model = resolve_model_source(cfg.model)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return EvalPlan(inputs.enriched, record_rows, splits, task_names, model)
