"""Per-task metrics with the research evaluation's semantics.

Parsing (as the research code): strip the prediction; if it contains ':' keep its first character
(`B: some option` -> `B`). A prediction is *valid* if it is then one of the gold labels seen in the
evaluated set (the research code's `set(label_list)`). Three figures per task:

- `score`: the research figure, invalid predictions dropped from predictions and references;
- `strict_score`: invalid predictions counted as wrong (kept, as an impossible label);
- `invalid`: how many predictions were dropped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ..errors import UsageError
from ..records import SPLITS, Record, normalise_split
from ..tasks import Task, get_task

INVALID = "<invalid>"


def parse_prediction(text: str | None, valid: Iterable[str]) -> str | None:
    """Research parsing: strip; `X: ...` -> `X`; None if not a valid label."""
    if text is None:
        return None
    pred = str(text).strip()
    if ":" in pred:
        pred = pred[0]
    return pred if pred in set(valid) else None


@dataclass
class TaskScore:
    task: str  # abbreviation
    primary: str  # metric name
    score: float | None
    strict_score: float | None
    invalid: int
    n: int
    companions: dict

    def as_dict(self) -> dict:
        return asdict(self)


def _metric(task: Task, refs: list[str], preds: list[str]) -> tuple[float, dict]:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    if not refs:
        return math.nan, {}
    acc = float(accuracy_score(refs, preds))
    if task.label_kind == "yes_no":
        p, r, f1 = _binary(refs, preds)
        comp = {"accuracy": acc, "precision": p, "recall": r, "f1": f1}
        return f1, comp
    labels_true = sorted(set(refs) | (set(preds) - {INVALID}))
    # Macro averages over the labels the research code's sklearn call would see: the union of
    # references and (valid) predictions.
    mp = float(precision_score(refs, preds, labels=labels_true, average="macro", zero_division=0))
    mr = float(recall_score(refs, preds, labels=labels_true, average="macro", zero_division=0))
    mf = float(f1_score(refs, preds, labels=labels_true, average="macro", zero_division=0))
    comp = {"accuracy": acc, "macro_precision": mp, "macro_recall": mr, "macro_f1": mf}
    primary = {"macro_f1": mf, "accuracy": acc, "recall_at_1": acc}[task.primary_metric]
    if task.primary_metric == "recall_at_1":
        comp["recall_at_1"] = acc
    return primary, comp


def _binary(refs: list[str], preds: list[str]) -> tuple[float, float, float]:
    tp = sum(r == "yes" and p == "yes" for r, p in zip(refs, preds))
    fp = sum(r != "yes" and p == "yes" for r, p in zip(refs, preds))
    fn = sum(r == "yes" and p != "yes" for r, p in zip(refs, preds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_task(task: str | Task, references: Sequence[str], predictions: Sequence[str | None]) -> TaskScore:
    """Score one task's predictions against its references (aligned lists)."""
    spec = task if isinstance(task, Task) else get_task(task)
    if len(references) != len(predictions):
        raise UsageError(
            f"{spec.abbr}: {len(predictions)} prediction(s) for {len(references)} reference(s); they must align"
        )
    valid = set(references)
    parsed = [parse_prediction(p, valid) for p in predictions]
    kept_refs = [r for r, p in zip(references, parsed) if p is not None]
    kept_preds = [p for p in parsed if p is not None]
    invalid = len(parsed) - len(kept_preds)
    score, comp = _metric(spec, kept_refs, kept_preds)
    strict, strict_comp = _metric(spec, list(references), [p if p is not None else INVALID for p in parsed])
    comp = {**comp, **{f"strict_{k}": v for k, v in strict_comp.items()}}
    return TaskScore(
        task=spec.abbr,
        primary=spec.metric_label,
        score=None if math.isnan(score) else round(score, 6),
        strict_score=None if math.isnan(strict) else round(strict, 6),
        invalid=invalid,
        n=len(references),
        companions={k: round(v, 6) for k, v in comp.items()},
    )


def score_records(records: Sequence[Record], predictions: Sequence[str | None]) -> dict[str, dict]:
    """Group aligned (record, prediction) pairs by task and score each: `{abbr: TaskScore dict}`."""
    if len(records) != len(predictions):
        raise UsageError(f"{len(predictions)} prediction(s) for {len(records)} record(s); they must align")
    refs: dict[str, list[str]] = defaultdict(list)
    preds: dict[str, list[str | None]] = defaultdict(list)
    for rec, pred in zip(records, predictions):
        if rec.output is None:
            raise UsageError(f"record {rec.id} has no gold `output`; cannot score it")
        abbr = rec.spec.abbr
        refs[abbr].append(rec.output)
        preds[abbr].append(pred)
    order = [t for t in ("AP", "CC", "PRP", "PSI", "MPC", "SA", "SR") if t in refs]
    return {abbr: score_task(abbr, refs[abbr], preds[abbr]).as_dict() for abbr in order}


UNSPLIT = "unsplit"  # the key for records that carry no split


def _split_key(split: str | None) -> str:
    return UNSPLIT if split is None or split == UNSPLIT else normalise_split(split) or UNSPLIT


def score_by_split(
    records: Sequence[Record], predictions: Sequence[str | None], *, splits: Iterable[str] | None = None
) -> dict[str, dict[str, dict]]:
    """`score_records` per split, never pooled: `{split: {abbr: TaskScore dict}}`.

    The paper reports the in-domain test (`test`) and the out-of-domain test (`ood_test`) apart, so
    rows of one task in different splits are scored separately. Without `splits`, every split present
    is scored, in the order train, val, test, ood_test, then records without a split (`unsplit`).
    With `splits` (any spelling `normalise_split` takes), exactly those are returned, in that order,
    an empty object for a split with no rows.
    """
    if len(records) != len(predictions):
        raise UsageError(f"{len(predictions)} prediction(s) for {len(records)} record(s); they must align")
    groups: dict[str, tuple[list[Record], list[str | None]]] = defaultdict(lambda: ([], []))
    for rec, pred in zip(records, predictions):
        recs, preds = groups[_split_key(rec.split)]
        recs.append(rec)
        preds.append(pred)
    if splits is None:
        order = [s for s in (*SPLITS, UNSPLIT) if s in groups]
    else:
        order = list(dict.fromkeys(_split_key(s) for s in splits))
    return {s: score_records(*groups[s]) if s in groups else {} for s in order}


def load_predictions(path: str, records: Sequence[Record]) -> list[str | None]:
    """Read predictions aligned with `records`.

    Accepts a JSON list of strings aligned by position (the research code's output), or JSONL of
    `{"id", "prediction"}` matched by record id (a record with no line counts as no answer).
    """
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if not stripped:
        raise UsageError(f"{path}: predictions file is empty")
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: malformed JSON list ({e.msg} at char {e.pos})") from None
        if len(values) != len(records):
            raise UsageError(
                f"{path}: {len(values)} prediction(s) for {len(records)} record(s); a JSON list must align by position"
            )
        return [None if v is None else str(v) for v in values]
    by_id: dict[str, str | None] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "id" not in obj or "prediction" not in obj:
            raise UsageError(f"{path}: line {lineno}: expected an object with 'id' and 'prediction'")
        by_id[str(obj["id"])] = obj["prediction"]
    known = {r.id for r in records}
    unknown = [i for i in by_id if i not in known]
    if unknown:
        raise UsageError(f"{path}: {len(unknown)} prediction id(s) match no record, e.g. {unknown[:3]}")
    return [by_id.get(r.id) for r in records]
