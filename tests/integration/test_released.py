"""The paper's path from the released data: records with `caption_info` -> enrich with `captioner.source:
record` and the research CQE -> train -> evaluate. Counts, statuses, the research keep rule and the prompts
(against the research code's rendering, `research_reference`) are checked; random tiny models' text is not."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from helpers import ROOT, train_config
from research_reference import research_prompt, research_vote

from caslie_core.config import EnrichConfig, EvaluateConfig, load_config
from caslie_core.io import store
from caslie_core.synthetic import write_catalog

pytestmark = pytest.mark.slow  # a Ray session and a training run: `make test`, not `make test-fast`

RESEARCH = [  # the demo's judges, set to the research preset's settings (the demo pins logits and 4 tokens)
    "cqe.vote=research",
    "judges.0.mode=generate",
    "judges.0.max_new_tokens=16",
    "judges.1.max_new_tokens=16",
]


@pytest.fixture(scope="module")
def released(ray_session, tmp_path_factory):
    """A released-shape catalog (captions in caption_info, images that do not exist: none is ever fetched)."""
    from ray_jobs import enrich

    root = tmp_path_factory.mktemp("released")
    m = write_catalog(root / "catalog", 56, seed=7, splits={"train": 0.6, "val": 0.1, "test": 0.3})
    rows = [json.loads(line) for line in open(m["jsonl"])]
    for r in rows:
        n = len(json.loads(r["images"]))
        r["images"] = json.dumps([f"https://unreachable.invalid/{r['id']}/{i}.jpg" for i in range(n)])
        r["caption_info"] = json.dumps([f"Photo of item {r['id']}, view {i}, café edition" for i in range(n)])
    rows[0]["caption_info"] = json.dumps([])  # a record whose released captions are missing
    rows[1]["caption_info"] = json.dumps([""] * len(json.loads(rows[1]["images"])))  # empty captions: "NA"
    path = root / "released.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = root / "enriched"
    cfg = load_config(
        EnrichConfig,
        ROOT / "configs" / "enrich-demo.yaml",
        [f"input.path={path}", f"output.path={out}", "captioner.source=record", *RESEARCH],
    )
    summary = enrich.run(cfg)
    return {"rows": rows, "summary": summary, "out": out, "cfg": cfg, "root": root}


def test_released_captions_are_judged_by_the_research_rule(released):
    rows, s = released["rows"], released["summary"]
    assert s["records"] == len(rows) and s["failed"] == 0
    out = {r["id"]: r for r in store.read_output(str(released["out"]))}
    assert set(out) == {r["id"] for r in rows}
    judges = [j.name for j in released["cfg"].judges]
    for r in rows:
        got = out[r["id"]]
        assert not any(res["cached"] for res in got["image_results"])  # no captioner ran
        info = json.loads(r["caption_info"])
        for res in got["image_results"]:
            i = res["index"]
            if r is rows[0]:  # no released caption: a caption error, judged as "NA" like the research code
                assert res["error"]["stage"] == "caption" and res["caption"] == "NA"
            elif r is rows[1]:
                assert res["caption"] == "NA" and res["error"] is None
            else:
                assert res["caption"] == info[i] and res["error"] is None
            ballots = [v["vote"] for v in sorted(res["votes"], key=lambda v: judges.index(v["judge"]))]
            assert [v["judge"] for v in res["votes"]] == judges and all(isinstance(b, str) for b in ballots)
            assert res["kept"] == (research_vote(ballots) == "yes")
        assert got["status"] == ("partial" if r is rows[0] else "ok")


def test_caslie_prompts_over_the_enrichment_output_matches_the_research_rendering(released):
    from ray_jobs.cli import main

    out = {r["id"]: r for r in store.read_output(str(released["out"]))}
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["prompts", str(released["out"]), "--model", "NingLab/CASLIE-M"]) == 0
    lines = {x["id"]: x["prompt"] for x in map(json.loads, buf.getvalue().splitlines())}
    assert set(lines) == set(out)
    for r in released["rows"]:
        results = sorted(out[r["id"]]["image_results"], key=lambda x: x["index"])
        captions = [x["caption"] for x in results]
        votes = ["yes" if x["kept"] else "no" for x in results]
        assert lines[r["id"]] == research_prompt(r, captions, votes, "mistral")


@pytest.fixture(scope="module")
def trained_on_released(released):
    from ray_jobs import train

    work = released["root"] / "train"
    cfg = train_config(released["out"], work, "optim.epochs=1", "eval.enabled=false", "data.captions=kept")
    return {"summary": train.run(cfg), "cfg": cfg}


def test_train_and_evaluate_on_the_released_path(released, trained_on_released):
    from ray_jobs import evaluate

    rows = released["rows"]
    n_train = sum(r["split"] == "train" for r in rows)
    assert trained_on_released["summary"]["data"]["train"]["usable"] == n_train
    work = released["root"] / "eval"
    cfg = load_config(
        EvaluateConfig,
        ROOT / "configs" / "evaluate-demo.yaml",
        [
            f"model.path={trained_on_released['cfg'].output.path}",
            f"input.path={released['out']}",
            f"output.path={work}",
            "data.splits=[test]",
            "ablations=[kept,none,all]",
            "ray.num_cpus=null",
            "ray.object_store_memory=null",
            "generation.max_new_tokens=2",
            "pool.num_cpus=0.5",
        ],
    )
    summary = evaluate.run(cfg)
    test_rows = {r["id"]: r for r in rows if r["split"] == "test"}
    out = {r["id"]: r for r in store.read_output(str(released["out"]))}
    for variant, vote_of in (("kept", None), ("none", "no"), ("all", "yes")):
        preds = [json.loads(x) for x in Path(summary["predictions"][variant]).read_text().splitlines()]
        assert sorted(p["id"] for p in preds) == sorted(test_rows)
        for p in preds:
            results = sorted(out[p["id"]]["image_results"], key=lambda x: x["index"])
            captions = [x["caption"] for x in results]
            votes = [vote_of or ("yes" if x["kept"] else "no") for x in results]
            assert p["prompt"] == research_prompt(test_rows[p["id"]], captions, votes, "alpaca")
