"""The paper's ablations as prompts: `kept` (the method: judged captions), `none` (every caption rendered
as rejected) and `all` (every caption, no voting); one prompt row per (record, ablation), rows failed in
enrichment (or that cannot be rendered in an ablation) counted with the reason. Rendering: `caslie_core.render`."""

from __future__ import annotations

from ..records import split_or_none
from ..render import CAPTION_MODES, RenderError, row_prompt  # noqa: F401 - RenderError: what variant_prompt raises
from ..tasks import get_task

VARIANTS = {
    "kept": "kept captions (CASLIE)",
    "none": "no captions (each rendered as rejected)",
    "all": "all captions (no voting)",
}
assert set(VARIANTS) == set(CAPTION_MODES)


def variant_prompt(row: dict, variant: str, *, style: str) -> str:
    return row_prompt(row, style=style, captions=variant)


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
            try:
                prompt, skip = variant_prompt(row, variant, style=style), None
            except RenderError as e:
                prompt, skip = None, f"cannot render '{variant}': {e.reason}"
            out.append(
                {
                    "id": row["id"],
                    "task": task,
                    "split": split,
                    "variant": variant,
                    "prompt": prompt,
                    "reference": row.get("output"),
                    "skip": skip,
                }
            )
    return out
