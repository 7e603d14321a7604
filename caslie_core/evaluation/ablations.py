"""The paper's ablations as prompts: `kept` (the method: judged captions), `none` (text only) and `all`
(every caption, no voting); one prompt row per (record, ablation), rows failed in enrichment counted."""

from __future__ import annotations

from ..enrichment.assemble import assemble
from ..prompts import instruction_prompt
from ..records import Record, json_or_text, split_or_none
from ..tasks import get_task

VARIANTS = {
    "kept": "kept captions (CASLIE)",
    "none": "no captions (text only)",
    "all": "all captions (no voting)",
}


def _loads(value, default):
    return default if value is None else json_or_text(value)


def is_enriched(row: dict) -> bool:
    return "image_results" in row and row.get("original_input") is not None


def variant_input(row: dict, variant: str) -> tuple:
    """(input, options) of one evaluation variant for an enriched output row or a raw record row."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation {variant!r}; valid: {', '.join(VARIANTS)}")
    if not is_enriched(row):
        if variant != "none":
            raise ValueError(f"ablation {variant!r} needs enriched records (captions); raw records support only 'none'")
        return _loads(row.get("input"), {}), _loads(row.get("options"), [])
    if variant == "kept":
        return _loads(row["input"], {}), _loads(row.get("options"), [])
    original, options = _loads(row["original_input"], {}), _loads(row.get("original_options"), [])
    if variant == "none":
        return original, options
    results = sorted(_loads(row.get("image_results"), []), key=lambda r: r["index"])
    captions = [r.get("caption") for r in results]
    record = Record(
        id=str(row["id"]),
        task=row["task"],
        instruction=row.get("instruction") or "",
        input=original,
        options=options,
        images=_loads(row.get("images"), []),
    )
    enriched = assemble(record, captions, [c is not None for c in captions])
    return enriched.input, enriched.options


def variant_prompt(row: dict, variant: str, *, style: str) -> str:
    input_value, options = variant_input(row, variant)
    return instruction_prompt(row.get("instruction") or "", input_value, options, style=style)


def prompt_rows(
    rows: list[dict], *, variants: list[str], style: str, splits: list[str], task_names: list[str] | None
) -> list[dict]:
    """Rows -> one prompt row per (record, ablation) in the wanted splits and tasks.

    Rows that failed enrichment (no task or text) come out with `skip` set, so they are counted."""
    out = []
    for row in rows:
        split = split_or_none(row.get("split"))
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
    return out
