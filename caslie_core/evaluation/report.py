"""The evaluation report (Ray-free): scoring per ablation, split and task, the paper-layout table (Markdown,
JSON), a PNG chart, the predictions files and the job's summary."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from ..config import EvaluateConfig
from ..tasks import get_task
from .ablations import VARIANTS
from .metrics import parse_prediction, score_task
from .plan import EvalPlan

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


# Share of captions kept by CQE in the paper (method page, section 4: "caption used %"), IND AP..SR.
PAPER_KEPT_SHARE = {"AP": 0.621, "CC": 0.623, "PRP": 0.505, "PSI": 0.785, "MPC": 0.720, "SA": 0.568, "SR": 0.303}


def kept_share_markdown(ours: dict | None) -> str:
    """Our enrichment's kept share per task (its summary.json) next to the paper's."""
    order = list(PAPER_KEPT_SHARE)
    lines = [
        "Captions kept by the judges (CQE), share of images per task (the paper's 'caption used %'):",
        "",
        "| | " + " | ".join(order) + " |",
        "|---|" + "---|" * len(order),
    ]
    if ours:
        lines.append("| ours: enrichment (all splits) | " + " | ".join(_fmt(ours.get(a)) for a in order) + " |")
    lines.append("| paper: v1 (IND) | " + " | ".join(_fmt(PAPER_KEPT_SHARE[a]) for a in order) + " |")
    return "\n".join(lines) + "\n"


def enrichment_kept_share(input_path: str) -> dict | None:
    """`kept_share` of the enrichment run whose output folder the evaluation reads (None when not one)."""
    import fsspec

    try:
        with fsspec.open(input_path.rstrip("/") + "/summary.json", "rt") as fh:
            return json.load(fh).get("kept_share")
    except (OSError, ValueError, AttributeError):
        return None


def column_label(split: str, abbr: str) -> str:
    metric = get_task(abbr).metric_label
    return f"{abbr} {metric}" if split == "test" else f"OOD {abbr}"


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


def write_predictions(rows: list[dict], variant: str, path: str) -> None:
    """One JSONL line per prompt of one ablation: prediction, parsed answer, reference, validity, error, prompt."""
    import fsspec

    with fsspec.open(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            if r["variant"] == variant:
                line = {"id": r["id"], "task": r["task"], "split": r["split"], "prediction": r["raw"]}
                line |= {k: r[k] for k in ("answer", "reference", "valid", "correct", "error")}
                line["prompt"] = r.get("prompt")  # exactly what the model was given (`caslie prompts` prints it too)
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_report(cfg: EvaluateConfig, plan: EvalPlan, rows: list[dict], skipped: dict, wall: float) -> dict:
    """Score the answered rows and write predictions, results.{json,md,png} and summary.json under output.path.

    Returns the summary; `summary["markdown"]` is the table as printed."""
    import tempfile
    from pathlib import Path

    import fsspec

    out = cfg.output.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    mark_valid(rows)
    rows.sort(key=lambda r: (r["variant"], r["split"], r["task"], r["id"]))
    paths = {}
    for variant in cfg.ablations:
        paths[variant] = f"{out}/predictions-{variant}.jsonl"
        write_predictions(rows, variant, paths[variant])
    scores = score_predictions(rows)
    table = results_table(scores, paper_rows=list(cfg.output.paper_rows), variants=list(cfg.ablations))
    kept_share = enrichment_kept_share(cfg.input.path)
    md = table_markdown(table) + "\n" + kept_share_markdown(kept_share)
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{plan.model.base}{' + adapter' if plan.model.adapter else ''}"
        chart = render_chart(table, str(Path(tmp) / "results.png"), title=title)
        fs.put(str(Path(tmp) / "results.png"), root + "/results.png")
    summary = eval_summary(cfg, plan, rows, skipped, wall, chart, paths)
    with fsspec.open(out + "/results.md", "wt") as fh:
        fh.write(md)
    with fsspec.open(out + "/results.json", "wt") as fh:
        json.dump(
            {"table": table, "scores": scores, "kept_share": {"ours": kept_share, "paper": PAPER_KEPT_SHARE}},
            fh,
            indent=2,
        )
    with fsspec.open(out + "/summary.json", "wt") as fh:
        json.dump(summary, fh, indent=2)
    return {**summary, "markdown": md}


def eval_summary(
    cfg: EvaluateConfig, plan: EvalPlan, rows: list[dict], skipped: dict, wall: float, chart: dict, paths: dict
) -> dict:
    out = cfg.output.path.rstrip("/")
    per = defaultdict(lambda: {"records": 0, "invalid": 0, "errors": 0})
    for r in rows:
        key = f"{r['variant']}/{r['split']}/{r['task']}"
        per[key]["records"] += 1
        per[key]["invalid"] += 0 if r["valid"] else 1
        per[key]["errors"] += 1 if r["error"] else 0
    new_tokens = sum(r["n_new_tokens"] or 0 for r in rows)
    return {
        "job": "evaluate",
        "model": plan.model.as_dict(),
        "ablations": list(cfg.ablations),
        "splits": plan.splits,
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
