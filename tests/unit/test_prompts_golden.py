"""Golden prompts: ours against the research code's own rendering, byte for byte (CASLIE_METHOD.md 2.4).

The reference below is the released research code transcribed (github.com/ninglab/CASLIE at ac17719:
templates/alpaca.json, templates/mistral.json, utils/prompter.py `generate_prompt`/`get_response`, and the
caption insertion of load_data.py), written here independently of `caslie_core`. Records cover all 7 tasks
with non-ASCII text, an empty options list, SR with a history and options, both templates, and captions
all / none / kept.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
from research_reference import TEMPLATES, research_prompt, research_response

from caslie_core import prompts, render


def _row(rid, task, inp, options, captions, output="A"):
    return {
        "id": rid,
        "task": task,
        "split": "test",
        "instruction": f"Instruction for {task} — réponse courte.",
        "input": json.dumps(inp),
        "options": json.dumps(options),
        "output": output,
        "images": json.dumps([f"https://img.example/{rid}/{i}.jpg" for i in range(len(captions))]),
        "caption_info": json.dumps(captions),
    }


RECORDS = [
    _row(
        "ap", "answerability_prediction", {"question": "Is the café mug dishwasher-safe?"}, [], ["A white mug"], "yes"
    ),
    _row(
        "cc", "category_classification", {"title": "Crème brûlée torch — pro"}, ["A: Kitchen", "B: Toys"], ["A torch"]
    ),
    _row(
        "prp",
        "product_relation_prediction",
        {"product 1": "Über phone case", "product 2": "Screen protector ✓"},
        ["A: also bought", "B: also viewed", "C: similar"],
        ["A black case", "A clear film"],
    ),
    _row(
        "psi",
        "product_substitute_identification",
        {"query": "jalapeño sauce", "product title": "Hot sauce"},
        [],
        ["A bottle"],
        "no",
    ),
    _row(
        "mpc",
        "multiclass_product_classification",
        {"query": "naïve art print", "product title": "Poster 50×70"},
        ["A: exact", "B: substitute", "C: complement", "D: irrelevant"],
        ["A framed poster"],
    ),
    _row(
        "sa",
        "sentiment_analysis",
        {"review": 'Très bien, "great" value'},
        ["A: positive", "B: negative"],
        ["A happy user"],
    ),
    _row(
        "sr",
        "sequential_recommendation",
        ["1st: Café grinder", "2nd: Espresso tamper"],
        ["A: Milk frother", "B: Moka pot ☕"],
        ["a grinder", "a tamper", "a frother", "a moka pot"],
    ),
]


def _enriched(row: dict, kept: list[bool]) -> dict:
    """The same record as enrichment output: its captions in image_results with the judges' decisions."""
    captions = json.loads(row["caption_info"])
    return {
        **{k: v for k, v in row.items() if k != "caption_info"},
        "status": "ok",
        "original_input": row["input"],
        "original_options": row["options"],
        "image_results": [{"index": i, "caption": c, "kept": k} for i, (c, k) in enumerate(zip(captions, kept))],
    }


@pytest.mark.parametrize("style", ["alpaca", "mistral"])
@pytest.mark.parametrize("row", RECORDS, ids=[r["id"] for r in RECORDS])
def test_prompts_equal_the_research_rendering_byte_for_byte(row, style):
    captions = json.loads(row["caption_info"])
    n = len(captions)
    # raw released records: all / none from caption_info
    assert render.row_prompt(row, style=style, captions="all") == research_prompt(row, captions, ["yes"] * n, style)
    assert render.row_prompt(row, style=style, captions="none") == research_prompt(row, captions, ["no"] * n, style)
    with pytest.raises(render.RenderError, match="needs the judges' votes"):
        render.row_prompt(row, style=style, captions="kept")
    # enrichment output: kept follows the decisions; all and none as for the raw record
    kept = [i % 2 == 0 for i in range(n)]
    enriched = _enriched(row, kept)
    votes = ["yes" if k else "no" for k in kept]
    assert render.row_prompt(enriched, style=style, captions="kept") == research_prompt(row, captions, votes, style)
    assert render.row_prompt(enriched, style=style, captions="all") == research_prompt(
        row, captions, ["yes"] * n, style
    )
    assert render.row_prompt(enriched, style=style, captions="none") == research_prompt(
        row, captions, ["no"] * n, style
    )


def test_the_rendering_details_the_issue_names():
    ap = render.row_prompt(RECORDS[0], style="alpaca", captions="none")
    assert "caf\\u00e9" in ap and "café" not in ap.split("### Input:")[1]  # ASCII escaping, as json.dumps
    assert "\n\n### Options:\n[]\n\n### Response:\n" in ap  # an empty options list keeps its section
    assert '"product information extracted from image": null' in ap  # a rejected caption: the key, null
    m = render.row_prompt(RECORDS[0], style="mistral", captions="none")
    assert m.startswith("[INST] Below is") and m.endswith("\n\n [/INST] ### Response:\n")
    sr = render.row_prompt(RECORDS[-1], style="alpaca", captions="none")
    assert "extracted from image" not in sr  # SR: nothing added for a rejected caption
    # free-form input (serving): options None leaves the section out, text input stays as it is
    free = prompts.instruction_prompt("Describe it.", "plain words", None)
    assert free == TEMPLATES["alpaca"]["prompt_no_options"].format(instruction="Describe it.", input="plain words")


@pytest.mark.parametrize("style", ["alpaca", "mistral"])
def test_the_answer_is_what_follows_the_prompt_up_to_the_next_marker(style):
    prompt = render.row_prompt(RECORDS[1], style=style, captions="all")
    marker = TEMPLATES[style]["response_split"]
    for generation in (" B", "B\n", f" A {marker} C", f"B\n\n{marker} D {marker} E", "  "):
        full = prompt + generation
        assert prompts.extract_response(full, style, prompt=prompt) == research_response(full, style)
        assert prompts.extract_response(generation, style) == research_response(full, style)


def test_styles_by_model_id_and_model_type(tmp_path):
    assert prompts.default_style_for("NingLab/CASLIE-M") == "mistral"  # its id does not say mistral
    assert prompts.default_style_for("mistralai/Mistral-7B-Instruct-v0.3") == "mistral"
    for mid in ("NingLab/CASLIE-S", "NingLab/CASLIE-L", "meta-llama/Llama-3.2-3B-Instruct", "tiny:lm"):
        assert prompts.default_style_for(mid) == "alpaca"
    folder = tmp_path / "merged-model"  # a local model whose name says nothing: its config's model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert prompts.default_style_for(str(folder)) == "mistral"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    assert prompts.default_style_for(str(adapter)) == "mistral"


def test_caslie_prompts_prints_the_same(tmp_path):
    from ray_jobs.cli import main

    path = tmp_path / "released.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    for style, extra in (("mistral", ["--model", "NingLab/CASLIE-M"]), ("alpaca", ["--style", "alpaca"])):
        for mode, vote in (("all", "yes"), ("none", "no")):
            buf = io.StringIO()
            with redirect_stdout(buf):
                assert main(["prompts", str(path), *extra, "--captions", mode]) == 0
            lines = [json.loads(x) for x in buf.getvalue().splitlines()]
            assert [x["id"] for x in lines] == [r["id"] for r in RECORDS]
            for line, row in zip(lines, RECORDS):
                n = len(json.loads(row["caption_info"]))
                assert set(line) == {"id", "prompt"}
                assert line["prompt"] == research_prompt(row, json.loads(row["caption_info"]), [vote] * n, style)
    # kept on raw records: every record says why it cannot be rendered, and the command fails
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["prompts", str(path), "--captions", "kept"]) == 1
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == len(RECORDS) and all(x["prompt"] is None and "votes" in x["error"] for x in lines)
