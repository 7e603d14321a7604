"""The evaluation job end to end: the fine-tuned tiny model on enriched test records, three ablations, table, chart."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def _write_enriched(catalog: Path, out: Path) -> int:
    """Enrichment-output rows for the catalog's test splits (captions made up, every other one kept) + one failed."""
    from caslie_core.enrichment.assemble import assemble
    from caslie_core.io.sources import load_records
    from caslie_core.io.store import OUTPUT_COLUMNS, output_schema

    rows = []
    for rec in load_records(str(catalog)).records:
        if rec.split not in ("test", "ood_test"):
            continue
        n = len(rec.images)
        captions = [f"a photo of item {i}" for i in range(n)]
        kept = [i % 2 == 0 for i in range(n)]
        enriched = assemble(rec, captions, kept)
        row = {c: None for c in OUTPUT_COLUMNS}
        row.update(
            {
                "id": rec.id,
                "task": rec.task,
                "split": rec.split,
                "status": "ok",
                "instruction": rec.instruction,
                "input": json.dumps(enriched.input),
                "options": json.dumps(enriched.options),
                "output": rec.output,
                "images": json.dumps(rec.images),
                "original_input": json.dumps(rec.input),
                "original_options": json.dumps(rec.options),
                "n_images": n,
                "n_failed_images": 0,
                "n_kept": sum(kept),
                "image_results": [
                    {"index": i, "caption": c, "kept": k} for i, (c, k) in enumerate(zip(captions, kept))
                ],
            }
        )
        rows.append(row)
    failed = {c: None for c in OUTPUT_COLUMNS}
    failed.update(
        {
            "id": "broken-1",
            "split": "test",
            "status": "failed",
            "n_images": 0,
            "n_failed_images": 0,
            "n_kept": 0,
            "error": {"stage": "validate", "message": "no task"},
        }
    )
    rows.append(failed)
    part = out / "records" / "task=mixed"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), part / "part-0.parquet")
    return len(rows) - 1


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    from caslie_core.config import EvaluateConfig, load_config
    from ray_jobs import evaluate

    work = tmp_path_factory.mktemp("evaluate")
    n = _write_enriched(trained["catalog"], work / "enriched")
    cfg = load_config(
        EvaluateConfig,
        ROOT / "configs" / "evaluate-demo.yaml",
        [
            f"model.path={trained['cfg'].output.path}",
            f"input.path={work / 'enriched'}",
            f"output.path={work / 'out'}",
            "ray.num_cpus=null",
            "ray.object_store_memory=null",
            "generation.max_new_tokens=4",
            "pool.num_cpus=0.5",
        ],
    )
    summary = evaluate.run(cfg)
    return {"summary": summary, "out": work / "out", "records": n, "catalog": trained["catalog"]}


def test_every_record_is_answered_per_ablation_and_the_failed_one_is_counted(evaluated):
    s = evaluated["summary"]
    assert s["model"]["source"] == "train_output" and s["model"]["adapter"].endswith("/adapter")
    assert s["model"]["base"] == "tiny:lm" and s["model"]["style"] == "alpaca"
    assert s["records"] == evaluated["records"] and s["prompts"] == 3 * evaluated["records"]
    assert s["not_evaluated"] == {"failed in enrichment": 1}
    for variant in ("kept", "none", "all"):
        lines = Path(s["predictions"][variant]).read_text().splitlines()
        assert len(lines) == evaluated["records"]
        assert {"id", "task", "split", "prediction", "answer", "reference", "valid"} <= set(json.loads(lines[0]))


def test_table_has_a_row_per_ablation_and_a_cell_per_task_and_split(evaluated):
    results = json.loads((evaluated["out"] / "results.json").read_text())
    table = results["table"]
    assert [r["variant"] for r in table["rows"]] == ["kept", "none", "all", None]
    for ours in table["rows"][:3]:  # 7 IND tasks + 5 OOD tasks scored for every ablation
        assert all(n and n > 0 for n in ours["n"]), ours
        # a research figure is None only when every answer of the group was invalid
        assert all(v is not None or inv == n for v, inv, n in zip(ours["values"], ours["invalid"], ours["n"]))
    md = (evaluated["out"] / "results.md").read_text()
    assert "| paper: CASLIE-M | 0.891 |" in md


def test_numbers_equal_caslie_score_on_the_written_predictions(evaluated):
    from ray_jobs.cli import main

    results = json.loads((evaluated["out"] / "results.json").read_text())
    for variant in ("kept", "none"):
        for split in ("test", "ood_test"):
            buf = io.StringIO()
            with redirect_stdout(buf):
                assert (
                    main(
                        [
                            "score",
                            str(evaluated["catalog"]),
                            str(evaluated["out"] / f"predictions-{variant}.jsonl"),
                            "--split",
                            split,
                        ]
                    )
                    == 0
                )
            cli = json.loads(buf.getvalue())
            assert list(cli) == [split]
            cli = cli[split]
            ours = results["scores"][variant][split]
            assert set(cli) == set(ours)
            for abbr in cli:
                assert cli[abbr]["score"] == ours[abbr]["score"]
                assert cli[abbr]["strict_score"] == ours[abbr]["strict_score"]
                assert cli[abbr]["invalid"] == ours[abbr]["invalid"]


def test_the_learned_rule_shows(evaluated):
    """The shared fine-tune saw the raw text (no captions): the text-only ablation is its training distribution."""
    rows = [json.loads(x) for x in Path(evaluated["summary"]["predictions"]["none"]).read_text().splitlines()]
    acc = sum(r["correct"] for r in rows) / len(rows)
    assert acc >= 0.9, acc
    results = json.loads((evaluated["out"] / "results.json").read_text())
    none = results["table"]["rows"][1]
    # Per task the test split has ~20 records (a standard error of ~0.11): 0.474 was seen once in four suite runs
    # with the overall accuracy above still >= 0.9. Chance is 0.25-0.5 per task.
    assert none["variant"] == "none" and min(none["strict"]) >= 0.4


def test_chart_png_has_the_bars(evaluated):
    from PIL import Image
    from pngbars import count_bars

    chart = evaluated["summary"]["chart"]
    path = evaluated["out"] / "results.png"
    assert Image.open(path).format == "PNG"
    assert chart["bars"] == 4 * 12 - sum(
        1
        for r in json.loads((evaluated["out"] / "results.json").read_text())["table"]["rows"]
        for v in r["values"]
        if not v
    )
    assert count_bars(path, chart["colors"]) == chart["bars"]
