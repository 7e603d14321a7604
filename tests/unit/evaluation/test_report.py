"""Evaluation pieces: ablation prompts, parsing of malformed answers, the paper-layout table, the chart's pixels."""

from __future__ import annotations

import json

import pytest
from pngbars import count_bars

from caslie_core.evaluation import ablations as A
from caslie_core.evaluation import report as E


def _enriched_row(task="category_classification"):
    return {
        "id": "c1",
        "task": task,
        "split": "test",
        "status": "ok",
        "instruction": "Pick the category.",
        "input": json.dumps({"title": "Acme red kettle", "product information extracted from image": None}),
        "options": json.dumps(["A: Electronics", "B: Kitchen"]),
        "output": "B",
        "original_input": json.dumps({"title": "Acme red kettle"}),
        "original_options": json.dumps(["A: Electronics", "B: Kitchen"]),
        "images": json.dumps(["http://x/1.png"]),
        "image_results": json.dumps([{"index": 0, "caption": "rejected cap", "kept": False}]),
    }


def test_ablation_prompts():
    row = _enriched_row()
    kept, none, every = (A.variant_prompt(row, v, style="alpaca") for v in ("kept", "none", "all"))
    key = '"product information extracted from image"'
    assert f"{key}: null" in kept and "rejected cap" not in kept  # the judges rejected it
    assert f"{key}: null" in none and "Acme red kettle" in none
    assert f'{key}: "rejected cap"' in every  # all captions, no voting
    accepted = {**row, "image_results": json.dumps([{"index": 0, "caption": "kept cap", "kept": True}])}
    assert f'{key}: "kept cap"' in A.variant_prompt(accepted, "kept", style="alpaca")
    with pytest.raises(A.RenderError, match="needs the judges' votes"):
        A.variant_prompt(
            {"id": "r", "task": "CC", "input": '{"title": "t"}', "options": "[]", "caption_info": '["c"]'},
            "kept",
            style="alpaca",
        )


@pytest.mark.parametrize(
    "raw,answer",
    [
        ("B", "B"),
        ("  B\n", "B"),
        ("B: Kitchen", "B"),
        ("B: Kitchen\nA: Electronics", "B"),
        ("", None),
        (None, None),
        ("Kitchen", None),
        ("The answer is B", None),
        ("b", None),
        ("E", None),
        ("A\nB", None),
    ],
)
def test_malformed_predictions_parse_as_the_method_says(raw, answer):
    rows = [
        {"variant": "kept", "split": "test", "task": "category_classification", "reference": ref, "raw": raw}
        for ref in ("A", "B")
    ]
    E.mark_valid(rows)
    assert rows[0]["answer"] == answer and rows[0]["valid"] is (answer is not None)


def test_scores_and_table_layout():
    rows = []
    for i in range(10):
        rows.append(
            {
                "variant": "kept",
                "split": "test",
                "task": "sentiment_analysis",
                "reference": "AB"[i % 2],
                "raw": "AB"[i % 2] if i < 8 else "nonsense",
            }
        )
        rows.append(
            {
                "variant": "kept",
                "split": "ood_test",
                "task": "answerability_prediction",
                "reference": "yes",
                "raw": "yes",
            }
        )
    scores = E.score_predictions(rows)
    assert scores["kept"]["test"]["SA"]["score"] == 1.0 and scores["kept"]["test"]["SA"]["invalid"] == 2
    assert scores["kept"]["test"]["SA"]["strict_score"] < 1.0
    table = E.results_table(scores, paper_rows=["CASLIE-M"])
    assert (
        table["columns"][:2] == ["AP F1", "CC R@1"] and table["columns"][7] == "OOD AP" and len(table["columns"]) == 12
    )
    ours, paper = table["rows"]
    assert ours["values"][5] == 1.0 and ours["values"][7] == 1.0 and ours["values"][0] is None
    assert paper["values"][0] == 0.891 and paper["model"] == "paper: CASLIE-M"
    md = E.table_markdown(table)
    assert md.count("\n| ours: kept captions (CASLIE) |") == 3 and "| paper: CASLIE-M | 0.891 |" in md


def test_chart_is_a_png_with_one_bar_per_value(tmp_path):
    from PIL import Image

    scores = {
        "kept": {"test": {"SA": {"score": 0.5, "strict_score": 0.5, "invalid": 0, "n": 4}}},
        "none": {
            "test": {
                "SA": {"score": 0.25, "strict_score": 0.25, "invalid": 0, "n": 4},
                "AP": {"score": 0.4, "strict_score": 0.4, "invalid": 0, "n": 4},
            }
        },
    }
    table = E.results_table(scores, paper_rows=["CASLIE-M"])
    path = tmp_path / "chart.png"
    info = E.render_chart(table, str(path))
    assert Image.open(path).format == "PNG"
    assert info["bars"] == 1 + 2 + 12
    assert count_bars(path, info["colors"]) == 15
