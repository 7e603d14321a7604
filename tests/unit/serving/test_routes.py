"""The service's routes without Ray or HTTP: `caslie_core.serving.routes` over the core's own engine
(`replica.LocalEngine`: the model parts every layout runs, with fake captioner and judges and a fake predictor),
the real image intake reading data: URIs, and the real model ids. What a route answers, which stage a deadline
finds it in, and how a failing model or image becomes the client's error."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
from fakes import FakeCaptioner, FakeJudge
from PIL import Image

from caslie_core import serving as sv
from caslie_core.images import FetchPolicy
from caslie_core.models.predictor import Answer
from caslie_core.serving import routes
from caslie_core.serving.engine import Decoding, Stage, Stream
from caslie_core.serving.replica import AnswerPart, CaptionPart, LocalEngine, PanelPart, Replica


def uri(colour=(200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RECORD = {
    "task": "PRP",
    "instruction": "How are the two products related?",
    "input": {"product 1": "Red mug", "product 2": "Blue mug"},
    "options": ["A: Similar", "B: Bought together", "C: Viewed together"],
    "images": [uri(), uri((10, 200, 10))],
}


class FakePredictor:
    """What `AnswerPart` needs of `models.predictor.AdapterPredictor`: answers with a token count per prompt."""

    def __init__(self, fail: bool = False) -> None:
        self.loaded: dict[str, str] = {}
        self.prompts: list[tuple[str, str | None]] = []
        self.fail = fail

    def answer(self, prompts, adapter=None, limit=None, sampling=None):
        self.prompts += [(p, adapter) for p in prompts]
        if self.fail:
            return [Answer(None, error="RuntimeError: device lost") for _ in prompts]
        cap = min(limit or 8, 8)
        return [Answer("A", n_prompt_tokens=len(p.split()), n_new_tokens=cap, raw="A: Similar") for p in prompts]

    def load(self, name, path):
        self.loaded[name] = path


def service(*, rule="strict", predictor=None, judge_fails=None) -> tuple[routes.Service, FakePredictor]:
    predictor = predictor or FakePredictor()
    replica = Replica(shared=True)

    async def load(name):
        if name != "shop":
            raise KeyError(name)
        predictor.loaded[name] = "/adapters/shop"

    engine = LocalEngine(
        replica,
        CaptionPart(FakeCaptioner(), replica),
        PanelPart({"a": FakeJudge(lambda q: True), "b": FakeJudge(lambda q: True, fail_on=judge_fails)}, replica),
        AnswerPart(predictor, replica, load),
    )
    catalog = sv.ServedModels(
        {"base_id": "org/base", "ids": {"org/base:shop": "shop", "org/base": "base"}, "aliases": {}, "store": None}
    )
    intake = sv.ImageIntake(
        FetchPolicy(),
        fetch_threads=2,
        decode_threads=2,
        per_request=2,
        size=16,
        max_pixels=10**6,
        max_decoded_bytes=10**7,
    )
    return routes.Service(engine, intake, catalog, "alpaca", rule=rule, max_images=4), predictor


def run(route, svc, req, seconds: float = 30.0):
    stage = Stage("reading the request", time.monotonic() + seconds)
    return asyncio.run(route(svc, req, stage)), stage


def test_enrich_and_predict_caption_judge_and_answer_each_image():
    svc, predictor = service()
    out, _ = run(routes.enrich, svc, sv.EnrichRequest(**RECORD))
    assert out["status"] == "ok" and out["n_kept"] == 2 and [i["kept"] for i in out["images"]] == [True, True]
    assert set(out["timings_ms"]) == {"fetch", "caption", "judge", "total"}
    assert all(set(i["votes"]) == {"a", "b"} for i in out["images"])
    got, stage = run(routes.predict, svc, sv.PredictRequest(**RECORD, adapter="org/base:shop"))
    assert got["model"] == "org/base:shop" and got["answer"] == "A" and got["valid"] is True
    assert predictor.prompts[-1][1] == "shop"  # answered with the adapter the request named
    assert got["images"][0]["caption"] in predictor.prompts[-1][0]  # the kept captions are in the prompt
    assert "predict" in got["timings_ms"] and stage.name == "answering"


def test_a_judge_that_fails_is_the_images_error_and_the_caption_is_not_kept():
    svc, _ = service(judge_fails=lambda q: True)
    out, _ = run(routes.enrich, svc, sv.EnrichRequest(**RECORD))
    assert out["status"] == "partial" and out["n_kept"] == 0
    for image in out["images"]:
        assert image["error"]["stage"] == "judge" and "b" in image["vote_errors"] and not image["kept"]


def test_chat_answers_or_streams_and_completions_answer_each_prompt():
    svc, predictor = service()
    chat = sv.ChatRequest(
        model="org/base",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Which?"}, {"type": "image_url", "image_url": {"url": uri()}}],
            }
        ],
        max_tokens=3,
    )
    out, _ = run(routes.chat, svc, chat)
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 3
    assert len(out["caslie"]["images"]) == 1 and predictor.prompts[-1][1] is None  # the base model
    asked = []

    async def tokens(prompt, decoding):
        asked.append((prompt, decoding))
        for piece in ("A", ": Similar"):
            yield {"delta": piece}
        yield {"done": True, "finish_reason": "stop", "n_prompt_tokens": 5, "n_new_tokens": 2}

    svc.engine.stream = lambda prompt, decoding: Stream(tokens(prompt, decoding))
    streamed = sv.ChatRequest(
        **{**chat.model_dump(exclude_none=True), "stream": True, "stream_options": {"include_usage": True}}
    )
    events, stage = run(routes.chat, svc, streamed)
    assert isinstance(events, routes.Events) and stage.name == "answering"

    async def drain(stream):
        return [e async for e in stream.events]

    sent = asyncio.run(drain(events))
    assert sent[-1] == "data: [DONE]\n\n" and '"usage"' in sent[-2] and len(sent) == 6  # role, 2 deltas, end, usage
    assert asked[0][1] == Decoding("base", 3, None) and "Which?" in asked[0][0]  # after captions and votes
    done, _ = run(routes.completions, svc, sv.CompletionRequest(model="org/base:shop", prompt=["a", "b c"]))
    assert [c["index"] for c in done["choices"]] == [0, 1] and done["usage"]["prompt_tokens"] == 3


def test_failures_become_the_clients_errors():
    svc, _ = service(predictor=FakePredictor(fail=True))
    with pytest.raises(sv.ApiError) as e:
        run(routes.predict, svc, sv.PredictRequest(**RECORD))
    assert e.value.status == 500 and e.value.code == "model_error"
    with pytest.raises(sv.ApiError) as e:
        run(routes.predict, svc, sv.PredictRequest(**RECORD, adapter="org/base:nope"))
    assert e.value.status == 404 and e.value.code == "model_not_found"
    bad = {**RECORD, "images": [uri(), "data:image/png;base64,AAAA"]}
    with pytest.raises(sv.ApiError) as e:
        run(routes.enrich, svc, sv.EnrichRequest(**bad))
    assert e.value.status == 422 and e.value.detail[0]["loc"] == ["body", "images", 1]
    out, _ = run(routes.enrich, svc, sv.EnrichRequest(**bad, image_errors="skip"))  # as the batch job does
    assert out["status"] == "partial" and out["images"][1]["error"]["stage"] == "decode"
    with pytest.raises(sv.ApiError) as e:
        parts = [{"type": "image_url", "image_url": {"url": uri()}}] * 5
        run(routes.chat, svc, sv.ChatRequest(model="org/base", messages=[{"role": "user", "content": parts}]))
    assert e.value.status == 422 and "at most 4" in e.value.detail[0]["msg"]


def test_research_rule_judges_a_missing_caption_as_na_online_too():
    svc, _ = service(rule="research")
    svc.engine.captioner.model = FakeCaptioner(fail_on=lambda image, prompt: True)
    out, _ = run(routes.enrich, svc, sv.EnrichRequest(**RECORD, image_errors="skip"))
    assert all(i["error"]["stage"] == "caption" for i in out["images"])
    assert all(set(i["votes"]) == {"a", "b"} for i in out["images"])  # judged anyway, as the research code does


def test_the_models_routes_list_the_served_ids():
    svc, _ = service()
    listed = asyncio.run(routes.models(svc))
    assert [c["id"] for c in listed["data"]] == ["org/base:shop", "org/base"]
    assert asyncio.run(routes.model(svc, "org/base:shop"))["parent"] == "org/base"
    assert Decoding("base").limit is None
