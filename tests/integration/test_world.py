"""The method's effect, shown through the real jobs on the synthetic world (catalog v2, trained captioner and
judges): synth -> enrich -> train on kept captions -> evaluate (kept, none, all), on a seed other than the
demo's; then the enrichment's report.html opened in a real headless Chromium."""

import json
import random
import re
import shutil
from collections import Counter

import pytest
from helpers import ROOT

from caslie_core import prompts
from caslie_core.config import EnrichConfig, EvaluateConfig, TrainConfig, load_config
from caslie_core.world.catalog import CHANCE, COLOURS, DRIVES, PATTERNS, SHAPES, write_world_catalog

pytestmark = pytest.mark.slow
SEED = 3  # the demo's is 0
IMAGE_TASKS, TEXT_TASKS = ("CC", "MPC", "PSI"), ("SA", "AP")


@pytest.fixture(scope="session")
def world_models(tiny_models):
    from caslie_core.world.models import ensure_world_models

    return ensure_world_models()


@pytest.fixture(scope="module")
def world(ray_session, world_models, tmp_path_factory):
    from ray_jobs import enrich, evaluate, train

    root = tmp_path_factory.mktemp("world")
    manifest = write_world_catalog(root / "catalog", 1050, seed=SEED, broken_images=4)
    cfg = load_config(
        EnrichConfig,
        ROOT / "configs" / "enrich-world.yaml",
        [f"input.path={manifest['jsonl']}", f"output.path={root / 'enriched'}"],
    )
    enriched = enrich.run(cfg)
    tcfg = load_config(
        TrainConfig,
        ROOT / "configs" / "train-demo.yaml",
        [
            f"input.path={root / 'enriched'}",
            f"run.storage_path={root / 'runs'}",
            f"output.path={root / 'model'}",
            "optim.epochs=8",  # the demo's 12 less a third, for the suite's time: MPC +0.72/+0.69, PSI +0.50/+0.79
        ],
    )
    train.run(tcfg)
    ecfg = load_config(
        EvaluateConfig,
        ROOT / "configs" / "evaluate-demo.yaml",
        [f"model.path={root / 'model'}", f"input.path={root / 'enriched'}", f"output.path={root / 'evaluation'}"],
    )
    evaluated = evaluate.run(ecfg)
    scores = json.loads((root / "evaluation" / "results.json").read_text())["scores"]
    return {"root": root, "manifest": manifest, "enriched": enriched, "evaluated": evaluated, "scores": scores}


def test_the_catalog_says_what_decides_each_task_and_has_enough_test_records(world):
    m = world["manifest"]
    assert {a for a, d in m["drives"].items() if d["by"] == "image"} == set(IMAGE_TASKS)
    assert m["drives"] == DRIVES and m["chance"]["CC"] == CHANCE["CC"] == 0.25
    assert min(m["test_records_per_task"].values()) >= 40
    assert 0.05 < m["uninformative_images"] / m["images"] < 0.15
    for line in open(m["jsonl"]):  # no image-only attribute is ever written in the text
        r = json.loads(line)
        words = set(re.findall(r"[a-z]+", (r["input"] + r["options"]).lower()))
        assert not words & {*COLOURS, *PATTERNS, *SHAPES}, r


def test_judges_keep_captions_where_pictures_decide_and_drop_them_elsewhere(world):
    kept = world["enriched"]["kept_share"]
    assert world["enriched"]["records"] == 1050 and world["enriched"]["failed"] == 0
    for a in IMAGE_TASKS:
        assert kept[a] >= 0.8, kept
    for a in TEXT_TASKS:
        assert kept[a] <= 0.2, kept


def test_kept_captions_beat_text_only_where_pictures_decide(world):
    s = world["scores"]
    for a in IMAGE_TASKS:
        kept, none = s["kept"]["test"][a]["score"], s["none"]["test"][a]["score"]
        assert kept - none >= 0.25, (a, kept, none)


def test_the_judges_cost_nothing_against_all_captions(world):
    s = world["scores"]
    tasks = sorted(s["kept"]["test"])
    kept = sum(s["kept"]["test"][a]["score"] for a in tasks) / len(tasks)
    every = sum(s["all"]["test"][a]["score"] for a in tasks) / len(tasks)
    assert kept >= every - 0.05, (kept, every)


def test_the_evaluation_prints_kept_shares_next_to_the_papers(world):
    md = (world["root"] / "evaluation" / "results.md").read_text()
    assert "caption used %" in md and "| paper: v1 (IND) | 0.621 |" in md
    ours = next(line for line in md.splitlines() if line.startswith("| ours: enrichment"))
    assert f"{world['enriched']['kept_share']['CC']:.3f}" in ours


def test_the_trained_captioner_says_what_the_picture_shows(world_models):
    from caslie_core.models.captioner import Captioner
    from caslie_core.world.models import _pixels, samples

    cap = Captioner("tiny:world-captioner", max_new_tokens=16, batch_size=32)
    held_out = samples(4242, 140)
    rng = random.Random(5)
    out = cap.caption(
        [_pixels(look, rng, 32) for *_, look in held_out], [prompts.caption_request(r, k) for _, r, k, _ in held_out]
    )
    # Context-conditioned: asked about the category it names the shape, about query relevance the colour,
    # about substitutes the pattern; about a text task the whole picture; of an uninformative one, nothing.
    kinds = {"CC": "shape", "MPC": "colour", "PSI": "pattern"}
    right, total = Counter(), Counter()
    for (abbr, *_, look), c in zip(held_out, out):
        kind = "blank" if look.blank else kinds.get(abbr, "whole")
        total[kind] += 1
        right[kind] += c.caption == look.caption_for(abbr)
    acc = {k: right[k] / total[k] for k in total}
    assert set(acc) == {"shape", "colour", "pattern", "whole", "blank"}
    assert min(acc.values()) >= 0.8, acc


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_the_trained_judge_answers_in_both_modes(world_models, mode):
    from caslie_core.models.judge import Judge
    from caslie_core.world.models import judge_answer, samples

    judge = Judge("tiny:world-judge", mode=mode, max_new_tokens=4)
    held_out = samples(777, 140)
    questions = [prompts.judge_question(r, k, look.caption) for _, r, k, look in held_out]
    gold = [judge_answer(a, look.caption) for a, _, _, look in held_out]
    votes = judge.vote(questions)
    assert sum(v.vote == g for v, g in zip(votes, gold)) / len(gold) >= 0.9


def _chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_the_report_opens_in_a_real_browser_with_its_pictures(world, tmp_path):
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium on this machine (make test installs it where apt can)")
    from playwright.sync_api import sync_playwright

    report = world["root"] / "enriched" / "report.html"
    summary = json.loads((world["root"] / "enriched" / "summary.json").read_text())
    assert summary["report"] == str(report)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(report.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        counts = page.inner_text("#counts")
        sections = page.eval_on_selector_all("section.task", "els => els.map(e => e.dataset.task)")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        statuses = page.eval_on_selector_all("tr.record", "els => els.map(e => e.dataset.status)")
        captions = page.eval_on_selector_all("td.caption", "els => els.map(e => e.textContent)")
        votes = page.eval_on_selector_all("td.votes", "els => els.map(e => e.textContent)")
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 20_000
    assert str(summary["records"]) in counts and str(summary["ok"]) in counts
    assert sorted(sections) == sorted(world["manifest"]["tasks"])
    assert len(images) >= 7 and all(done and w > 0 and h > 0 for done, w, h in images)
    assert {"ok", "partial"} <= set(statuses)  # broken pictures are shown with their error
    assert any(c.strip() for c in captions) and all("judge_logits" in v for v in votes if v.strip() != "–")
