"""One caption-and-vote rule for the batch job and the service: the same records through the batch job's stages
and through the service's engine (the core's model parts every layout runs: one panel, as layouts panel,
colocated and single; or a part per judge with their votes merged, as layout split) give the same votes, kept
flags and errors, a judge failing on some captions included, under both vote rules."""

import asyncio
import json

import numpy as np
import pytest
from fakes import FakeCaptioner, FakeJudge

from caslie_core.enrichment import stages
from caslie_core.images import FetchPolicy
from caslie_core.items import PIXELS, images_from_column
from caslie_core.records import parse_record
from caslie_core.serving.engine import merge_votes
from caslie_core.serving.flow import RecordSubject
from caslie_core.serving.replica import CaptionPart, LocalEngine, PanelPart, Replica
from caslie_core.synthetic import write_catalog

SIZE = 32


def _judges():  # fresh each time: the fakes count what they were asked
    return {
        "lenient": FakeJudge(lambda q: len(q) % 3 != 0),
        "flaky": FakeJudge(lambda q: len(q) % 2 == 0, fail_on=lambda q: len(q) % 5 == 0),
    }


def _batch(rows, rule):
    table = stages.prepare(rows, policy=FetchPolicy(allow_local_files=True), threads=2, max_pixels=10**7, size=SIZE)
    prepared = (images_from_column(table.column("images")), table.column(PIXELS).to_pylist())
    out = stages.CaptionStage(FakeCaptioner(fail_on=lambda image, prompt: len(prompt) % 4 == 0), SIZE)(table)
    for name, judge in _judges().items():
        out = stages.JudgeStage(judge, name, judge_missing=rule == "research")(out)
    return prepared, stages.finalize(out, provenance={"cqe_vote": rule})


def _service(raw: dict, prepared_slots, pixels, rule, layout):
    """The service's engine over the same decoded images: the core's caption and panel parts."""
    subject = RecordSubject(parse_record(raw))
    slots = subject.slots(rule)
    for slot, done in zip(slots, prepared_slots):
        slot.error = done.error
        if done.error is None:
            slot.pixels = np.frombuffer(pixels[done.index], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    replica = Replica()
    captioner = CaptionPart(FakeCaptioner(fail_on=lambda image, prompt: len(prompt) % 4 == 0), replica)
    engine = LocalEngine(replica, captioner, PanelPart(_judges(), replica), None)
    if layout == "split":  # a Judge_<name> deployment per judge, their votes merged by the ingress's engine
        parts = [PanelPart({name: judge}, replica) for name, judge in _judges().items()]

        async def votes(questions):
            return merge_votes([await p.many(questions) for p in parts])

        engine.votes = votes
    slots, _ = asyncio.run(engine.enrich(subject, slots))
    return slots


@pytest.mark.parametrize("layout", ["panel", "split"])
@pytest.mark.parametrize("rule", ["strict", "research"])
def test_the_service_keeps_and_fails_images_as_the_batch_job_does(tmp_path, rule, layout):
    m = write_catalog(tmp_path, 16, seed=21, broken_images=2, tasks=["CC", "SA", "SR"])
    raws = [json.loads(line) for line in open(m["jsonl"])]
    (images, pixels), written = _batch([{"text": json.dumps(r)} for r in raws], rule)
    errors = {"judge": 0, "caption": 0, "fetch": 0}
    for raw, prepared, px, row in zip(raws, images, pixels, written):
        assert row["id"] == raw["id"]
        served = _service(raw, prepared, px, rule, layout)
        assert len(served) == len(row["image_results"])
        for slot, res in zip(served, row["image_results"]):
            batch_votes = {v["judge"]: v["vote"] for v in res["votes"] if v["vote"] is not None or v["error"]}
            batch_errors = {v["judge"]: v["error"] for v in res["votes"] if v["error"]}
            assert slot.votes == batch_votes, (raw["id"], slot.index)
            assert slot.vote_errors == batch_errors
            assert slot.report()["vote_errors"] == batch_errors  # a failed judge is shown, never an abstention
            assert slot.kept == res["kept"] and slot.caption == res["caption"]
            assert (slot.error or {}).get("stage") == (res["error"] or {}).get("stage")
            if res["error"]:
                errors[res["error"]["stage"]] = errors.get(res["error"]["stage"], 0) + 1
    assert errors["judge"] > 0 and errors["caption"] > 0  # each failing path was exercised
