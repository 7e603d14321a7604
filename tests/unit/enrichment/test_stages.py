"""The enrichment stages without Ray, on the real tiny models."""

import json
import shutil

import pytest

from caslie_core.enrichment import pipeline, stages
from caslie_core.images import FetchPolicy
from caslie_core.items import images_from_column
from caslie_core.synthetic import write_catalog


@pytest.fixture(scope="module")
def models(tiny_models):
    from caslie_core.models.captioner import Captioner
    from caslie_core.models.judge import Judge

    return {
        "captioner": Captioner("tiny:captioner", max_new_tokens=6, batch_size=4),
        "logits": Judge("tiny:lm", mode="logits"),
        "generate": Judge("tiny:lm", mode="generate", max_new_tokens=3),
    }


class CountingCaptioner:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def caption(self, images, prompts):
        self.calls += len(images)
        return self.inner.caption(images, prompts)


def test_pipeline_accounts_for_every_record_and_dedups(models, tmp_path):
    m = write_catalog(tmp_path, 14, seed=5, broken_images=3)
    rows = [{"text": line} for line in open(m["jsonl"])]
    # Two copies of the same CC record under new ids: identical (image, request) pairs.
    cc = next(json.loads(r["text"]) for r in rows if "category" in r["text"])
    for k in range(2):
        rows.append({"text": json.dumps({**cc, "id": f"dup{k}"})})
    rows.append({"text": "{not json"})
    rows.append({"text": json.dumps({**cc, "id": "badtask", "task": "nope"})})
    counting = CountingCaptioner(models["captioner"])
    out = pipeline.run_local(
        rows,
        policy=FetchPolicy(allow_local_files=True),
        captioner=counting,
        judges={"lg": models["logits"], "gen": models["generate"]},
        size=32,
        max_pixels=10**7,
        provenance={"run_id": "t"},
        batch=5,
    )
    assert len(out) == len(rows)
    by_id = {o["id"]: o for o in out}
    assert by_id["badtask"]["status"] == "failed"
    assert by_id["badtask"]["error"]["stage"] == "validate"
    bad_json = [o for o in out if o["id"].startswith("raw-")]
    assert len(bad_json) == 1 and "malformed JSON" in bad_json[0]["error"]["message"]
    assert bad_json[0]["raw"] == "{not json"
    broken = {b["id"]: b["kind"] for b in m["broken_images"]}
    for rid, kind in broken.items():
        o = by_id[rid]
        assert o["status"] == "partial" and o["n_failed_images"] >= 1
        res = o["image_results"][0]
        assert res["caption"] is None and not res["kept"]
        assert res["error"]["stage"] == ("fetch" if kind == "missing" else "decode")
    ok = [o for o in out if o["status"] == "ok"]
    assert ok and all(o["n_failed_images"] == 0 for o in ok)
    for o in ok:
        results = o["image_results"]
        votes = {v["judge"]: v["vote"] for v in results[0]["votes"]}
        assert len(results) == o["n_images"] and list(votes) == ["lg", "gen"]
        assert votes["lg"] in ("yes", "no")  # logits mode always answers
        assert votes["gen"] in ("yes", "no", None)
        assert o["n_kept"] == sum(r["kept"] for r in results)
    # the duplicates were captioned once: their captions were served from the cache
    total_images = sum(o["n_images"] - o["n_failed_images"] for o in out if o["status"] != "failed")
    assert counting.calls == total_images - 2
    assert all(by_id[f"dup{k}"]["image_results"][0]["cached"] for k in range(2))
    summary = pipeline.summarize(out)
    assert summary["records"] == len(rows) and summary["failed"] == 2
    assert summary["ok"] + summary["partial"] + summary["failed"] == len(rows)


def test_enriched_input_uses_kept_captions_only(models, tmp_path):
    m = write_catalog(tmp_path, 7, seed=9)
    rows = [{"text": line} for line in open(m["jsonl"])]
    out = pipeline.run_local(
        rows,
        policy=FetchPolicy(allow_local_files=True),
        captioner=models["captioner"],
        judges={"lg": models["logits"]},
        size=32,
        max_pixels=10**7,
        provenance={},
    )
    for o in out:
        res = o["image_results"]
        inp = json.loads(o["input"])
        if o["task"] == "category_classification":
            val = inp["product information extracted from image"]
            assert (val is not None) == res[0]["kept"]
            if res[0]["kept"]:
                assert val == res[0]["caption"]
        assert json.loads(o["original_input"]) != inp or o["task"] == "sequential_recommendation"


def test_internal_error_becomes_failed_row_not_exception():
    from caslie_core.items import ImageSlot, Item, items_to_table

    broken = Item("x", task="sequential_recommendation", instruction="i", input=None, images=[ImageSlot(0, "u")])
    fine = Item("y", task="category_classification", instruction="i", input={"title": "t"}, images=[ImageSlot(0, "u")])
    out = stages.finalize(items_to_table([broken, fine]), provenance={})
    assert out[0]["status"] == "failed" and out[0]["error"]["stage"] == "finalize"
    assert out[0]["error"]["message"] and out[1]["status"] == "ok"


def test_caption_failure_is_recorded_per_image(tmp_path):
    class Broken:
        def caption(self, images, prompts):
            from caslie_core.models.captioner import CaptionResult

            return [CaptionResult(None, "RuntimeError: CUDA out of memory") for _ in images]

    m = write_catalog(tmp_path, 2, seed=1, tasks=["CC"])
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    rows = [{"text": line} for line in open(m["jsonl"])]
    table = stages.prepare(rows, policy=FetchPolicy(allow_local_files=True), threads=2, max_pixels=10**7, size=32)
    out = stages.finalize(stages.CaptionStage(Broken(), 32)(table), provenance={})
    for o in out:
        assert o["status"] == "partial"
        assert o["image_results"][0]["error"] == {
            "stage": "caption",
            "message": "RuntimeError: CUDA out of memory",
        }


def test_claims_make_a_second_actor_wait_for_the_first(tiny_models, tmp_path):
    """Two actors, one cache: a pair claimed by actor A is not captioned by actor B, who waits for it;
    a pair whose claimant fails is released and captioned by the waiter."""
    import threading

    from caslie_core.enrichment.cache import ClaimTable
    from caslie_core.models.captioner import CaptionResult

    class Slow:
        def __init__(self, fail=False):
            self.calls, self.fail = 0, fail

        def caption(self, images, prompts):
            import time

            self.calls += len(images)
            time.sleep(0.3)
            return [CaptionResult(None, "boom") if self.fail else CaptionResult(f"cap {p[-8:]}") for p in prompts]

    m = write_catalog(tmp_path, 3, seed=2, tasks=["CC"])
    rows = [{"text": line} for line in open(m["jsonl"])]
    base = stages.prepare(rows, policy=FetchPolicy(allow_local_files=True), threads=2, max_pixels=10**7, size=32)

    def fresh():
        return base

    for fail_first in (False, True):
        cache = ClaimTable(ttl=60, max_entries=1000)
        a, b = Slow(fail=fail_first), Slow()
        out = {}
        stage_a = stages.CaptionStage(a, 32, cache, owner="A")
        ta = threading.Thread(target=lambda s=stage_a, o=out: o.update(a=s(fresh())))
        ta.start()
        import time

        time.sleep(0.1)  # A holds the claims now
        out["b"] = stages.CaptionStage(b, 32, cache, owner="B", poll_s=0.02)(fresh())
        ta.join()
        assert a.calls == 3
        if fail_first:
            assert b.calls == 3  # released after A failed, then B did the work
        else:
            images = images_from_column(out["b"].column("images"))
            assert b.calls == 0 and all(row[0].caption and row[0].cached for row in images)


def test_a_deferred_stage_loads_its_model_only_when_a_row_arrives():
    import pyarrow as pa

    from caslie_core.enrichment.stages import Deferred

    built: list[int] = []

    def make():
        built.append(1)
        return lambda batch: batch.append_column("seen", pa.array([True] * batch.num_rows))

    empty, rows = pa.table({"id": pa.array([], pa.string())}), pa.table({"id": ["a", "b"]})
    lazy = Deferred(make, lazy=True)
    assert lazy(empty) is empty and built == []  # a resumed, finished catalog: no model ever built
    assert lazy(rows).column("seen").to_pylist() == [True, True] and built == [1]
    lazy(rows)
    assert built == [1]  # built once
    Deferred(make)
    assert built == [1, 1]  # eager by default: a fresh run loads while the first batches are fetched


def test_finalize_keeps_captions_by_the_configured_vote_rule():
    """Ballots yes, yes, not, not, not: strict keeps (2 yes, 0 no); the research rule does not ("not" wins).
    The rule reaches finalize through the provenance (`cqe_vote`), as the job passes it."""
    from caslie_core.items import ImageSlot, Item, items_to_table

    def item():
        slot = ImageSlot(0, "u", caption="a red kettle")
        slot.votes = dict(zip("abcde", ["yes", "yes", "not", "not", "not"]))
        return Item("x", task="category_classification", instruction="i", input={"title": "t"}, images=[slot])

    key = "product information extracted from image"
    strict = stages.finalize(items_to_table([item()]), provenance={"cqe_vote": "strict"})[0]
    research = stages.finalize(items_to_table([item()]), provenance={"cqe_vote": "research"})[0]
    assert strict["image_results"][0]["kept"] and json.loads(strict["input"])[key] == "a red kettle"
    assert not research["image_results"][0]["kept"] and json.loads(research["input"])[key] is None
    assert research["n_kept"] == 0 and strict["n_kept"] == 1


def test_batch_outcomes_count_each_stage_as_the_written_tally_does(models, tmp_path):
    """`outcomes.count` on the pools' output batches (what the helper turns into the per-stage metric) agrees with
    the tally of the rows written: images per stage and outcome, validation failures, a judge that fails."""
    from caslie_core.enrichment import outcomes
    from caslie_core.models.judge import Vote

    class Flaky:  # fails on every second question: those images fail at stage judge
        def vote(self, questions):
            return [Vote(None, None, "boom") if i % 2 else Vote("yes", None, None) for i, _ in enumerate(questions)]

    m = write_catalog(tmp_path, 10, seed=7, broken_images=2)
    rows = [{"text": line} for line in open(m["jsonl"])] + [{"text": "{not json"}]
    table = stages.prepare(rows, policy=FetchPolicy(allow_local_files=True), threads=2, max_pixels=10**7, size=32)
    captioned = stages.CaptionStage(models["captioner"], 32)(table)
    first = outcomes.count(captioned, arrivals=True, caption=True)
    judged = stages.JudgeStage(Flaky(), "fl")(stages.JudgeStage(models["logits"], "lg")(captioned))
    votes = outcomes.count(judged, judges=("lg", "fl"))
    t = pipeline.tally(stages.finalize(judged, provenance={}))
    images = sum(t["images_per_task"].values())
    assert first["validate/failed"] == t["errors_per_stage"]["validate"] == 1
    assert first["fetch_decode/ok"] + first["fetch_decode/failed"] == images
    errors = t["errors_per_stage"]
    assert first["fetch_decode/failed"] == errors.get("fetch", 0) + errors.get("decode", 0) > 0, errors
    assert first["caption/ok"] + first.get("caption/cached", 0) == first["fetch_decode/ok"]
    assert votes["lg/ok"] == first["fetch_decode/ok"] and "lg/failed" not in votes
    assert votes["fl/failed"] == t["errors_per_stage"]["judge"] > 0
    assert votes["fl/ok"] + votes["fl/failed"] == first["fetch_decode/ok"]
    assert outcomes.count(judged.slice(0, 0), arrivals=True) == {}
