"""Evaluation pieces (Ray-free): prompts per ablation, scoring per split and task, the paper-layout table, a chart.

Ablations (section 2 of the method page):
- `kept`: the method: captions the judges kept, written into the input (the enriched `input`);
- `none`: text only, no captions (the record's original input);
- `all`: every caption that was generated, no voting.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .enrichment import assemble
from .metrics import parse_prediction, score_task
from .prompts import instruction_prompt
from .records import Record
from .tasks import get_task
from .training import json_or_text

VARIANTS = {
    "kept": "kept captions (CASLIE)",
    "none": "no captions (text only)",
    "all": "all captions (no voting)",
}
IND_COLUMNS = [
    ("test", "AP"),
    ("test", "CC"),
    ("test", "PRP"),
    ("test", "PSI"),
    ("test", "MPC"),
    ("test", "SA"),
    ("test", "SR"),
]
OOD_COLUMNS = [("ood_test", "AP"), ("ood_test", "CC"), ("ood_test", "PRP"), ("ood_test", "SA"), ("ood_test", "SR")]
COLUMNS = IND_COLUMNS + OOD_COLUMNS
# The paper's v1 table (method page, section 4): IND AP..SR, then OOD AP, CC, PRP, SA, SR.
PAPER_RESULTS = {
    "CASLIE-M": [0.891, 0.979, 0.566, 0.398, 0.731, 0.656, 0.223, 0.855, 0.977, 0.585, 0.625, 0.330],
    "CASLIE-S": [0.871, 0.963, 0.504, 0.336, 0.707, 0.601, 0.196, 0.857, 0.959, 0.580, 0.647, 0.297],
    "CASLIE-L": [0.868, 0.969, 0.473, 0.268, 0.706, 0.651, 0.190, 0.840, 0.968, 0.531, 0.607, 0.297],
    "best baseline": [0.876, 0.971, 0.568, 0.340, 0.725, 0.632, 0.218, 0.860, 0.965, 0.564, 0.659, 0.312],
}


def column_label(split: str, abbr: str) -> str:
    metric = get_task(abbr).metric_label
    return f"{abbr} {metric}" if split == "test" else f"OOD {abbr}"


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


def score_predictions(rows: list[dict]) -> dict:
    """{variant: {split: {abbr: TaskScore dict}}} from prediction rows (variant, split, task, reference, raw)."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: ([], []))))
    for r in rows:
        refs, preds = groups[r["variant"]][r["split"]][get_task(r["task"]).abbr]
        refs.append(r["reference"])
        preds.append(r["raw"])
    order = ["AP", "CC", "PRP", "PSI", "MPC", "SA", "SR"]
    return {
        variant: {
            split: {abbr: score_task(abbr, *by_task[abbr]).as_dict() for abbr in order if abbr in by_task}
            for split, by_task in by_split.items()
        }
        for variant, by_split in groups.items()
    }


def mark_valid(rows: list[dict]) -> None:
    """Set `answer` (parsed label) and `valid` on prediction rows, with the research semantics: the valid
    labels of a task are the gold labels seen in its scored group (variant, split, task)."""
    labels: dict = defaultdict(set)
    for r in rows:
        labels[(r["variant"], r["split"], r["task"])].add(r["reference"])
    for r in rows:
        answer = parse_prediction(r["raw"], labels[(r["variant"], r["split"], r["task"])])
        r["answer"] = answer
        r["valid"] = answer is not None
        r["correct"] = answer == r["reference"]


def results_table(scores: dict, *, paper_rows: list[str] = ("CASLIE-M",), variants: list[str] | None = None) -> dict:
    """The paper's layout: one row per evaluated variant (plus the paper's rows), 12 metric columns.

    A cell is None where that split/task was not evaluated."""
    cols = [column_label(s, a) for s, a in COLUMNS]
    rows = []
    for variant in variants or list(scores):
        by_split = scores.get(variant, {})
        values, strict, invalid, n = [], [], [], []
        for split, abbr in COLUMNS:
            cell = by_split.get(split, {}).get(abbr)
            values.append(None if cell is None else cell["score"])
            strict.append(None if cell is None else cell["strict_score"])
            invalid.append(None if cell is None else cell["invalid"])
            n.append(None if cell is None else cell["n"])
        rows.append(
            {
                "model": f"ours: {VARIANTS.get(variant, variant)}",
                "variant": variant,
                "values": values,
                "strict": strict,
                "invalid": invalid,
                "n": n,
            }
        )
    for name in paper_rows:
        rows.append(
            {
                "model": f"paper: {name}",
                "variant": None,
                "values": list(PAPER_RESULTS[name]),
                "strict": None,
                "invalid": None,
                "n": None,
            }
        )
    return {"columns": cols, "rows": rows}


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table_markdown(table: dict) -> str:
    head = "| model | " + " | ".join(table["columns"]) + " |"
    sep = "|---|" + "---|" * len(table["columns"])
    lines = [head, sep]
    for row in table["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(v) for v in row["values"]) + " |")
    ours = [r for r in table["rows"] if r["invalid"] is not None]
    if ours:
        lines += [
            "",
            "Invalid answers (dropped by the research figure; strict figure counts them wrong):",
            "",
            head,
            sep,
        ]
        for row in ours:
            lines.append(
                f"| {row['model']} | " + " | ".join("–" if v is None else str(v) for v in row["invalid"]) + " |"
            )
        lines += ["", "Strict figures:", "", head, sep]
        for row in ours:
            lines.append(f"| {row['model']} | " + " | ".join(_fmt(v) for v in row["strict"]) + " |")
    return "\n".join(lines) + "\n"


SERIES_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def render_chart(table: dict, path: str, *, title: str = "CASLIE evaluation") -> dict:
    """A grouped bar chart (PNG) of the table: one group per column, one bar per row with a value.

    Bars have flat series colours (no edges, no transparency) and the legend sits above the axes,
    so the picture can be checked by its pixels. Returns {"bars": n, "colors": [...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = table["columns"], table["rows"]
    fig, ax = plt.subplots(figsize=(max(8, len(cols) * 0.9), 4.5), dpi=100)
    width = 0.8 / max(1, len(rows))
    bars = 0
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, v in enumerate(row["values"]) if v is not None]
        hs = [v for v in row["values"] if v is not None]
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        ax.bar(
            xs,
            hs,
            width=width * 0.85,
            color=color,
            edgecolor="none",
            linewidth=0,
            label=row["model"],
            antialiased=False,
        )
        bars += sum(1 for h in hs if h > 0)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title, pad=40)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(3, len(rows)), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return {"bars": bars, "colors": [SERIES_COLORS[i % len(SERIES_COLORS)] for i in range(len(rows))]}


__all__ = [
    "VARIANTS",
    "COLUMNS",
    "PAPER_RESULTS",
    "variant_prompt",
    "variant_input",
    "score_predictions",
    "mark_valid",
    "results_table",
    "table_markdown",
    "render_chart",
    "is_enriched",
]
