"""The captioner and judges over an OpenAI-compatible server (`engine: openai`), without Ray, against the tests'
own server (`openaiserver.FakeOpenAI`): what goes over the wire, what comes back, and every fault as that item's
error or one clear error at start."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from openaiserver import FakeOpenAI, judge_says

from caslie_core.config.engines import OpenAIEndpoint
from caslie_core.config.enrich import CaptionerConfig, JudgeConfig
from caslie_core.errors import ConfigError, EngineError
from caslie_core.models.registry import build_captioner, build_judge
from caslie_core.models.remote import preflight


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def endpoint(server, **kw) -> dict:
    return {"base_url": server.url, "model": server.model, "backoff": 0.01, **kw}


def judge(server, mode="logits", **kw):
    return build_judge(JudgeConfig(name="j", model="x", mode=mode, engine="openai", openai=endpoint(server, **kw)))


def captioner(server, **kw):
    return build_captioner(CaptionerConfig(model="x", engine="openai", openai=endpoint(server, **kw)))


QUESTIONS = ["Is it useful?", "Is it a mug, really?", "Does it show a red handle?", "Yes?"]


def test_captions_go_as_data_urls_and_come_back_in_order(server):
    pixels = [np.full((16, 16, 3), c, dtype=np.uint8) for c in (10, 120, 250)]
    out = captioner(server, max_concurrency=3).caption(pixels, ["a", "bb", "ccc"])
    assert [r.error for r in out] == [None] * 3
    assert [r.caption.endswith(f"of {n} characters") for n, r in zip((1, 2, 3), out)] == [True] * 3
    assert len({r.caption for r in out}) == 3  # each image its own (the digest of its data URL)
    part = server.bodies[0]["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    assert server.bodies[0]["max_tokens"] == 128 and server.bodies[0]["temperature"] == 0


def test_judges_vote_by_logprobs_or_by_the_answer(server):
    for mode in ("logits", "generate"):
        votes = judge(server, mode).vote(QUESTIONS)
        assert [v.vote for v in votes] == [judge_says(q) for q in QUESTIONS] and not any(v.error for v in votes)
    assert server.bodies[0]["logprobs"] is True and server.bodies[0]["max_tokens"] == 1
    assert server.bodies[-1]["max_tokens"] == 16 and "logprobs" not in server.bodies[-1]


def test_a_server_without_logprobs_is_an_error_never_a_no(server):
    server.logprobs = False
    votes = judge(server).vote(QUESTIONS)
    assert all(v.vote is None and "no logprobs" in v.error for v in votes)
    j = JudgeConfig(name="j", model="x", mode="logits", engine="openai", openai=endpoint(server))
    assert preflight(j, "judges.0")["logprobs"] is False


def test_busy_servers_are_waited_for_and_failures_are_the_items_errors(server):
    server.busy_first, server.retry_after = 2, "0.3"
    t = time.monotonic()
    out = captioner(server, max_concurrency=1, retries=3).caption([np.zeros((8, 8, 3), np.uint8)], ["a"])
    assert out[0].error is None and time.monotonic() - t >= 0.6  # Retry-After honoured twice
    server.fail = lambda text: 500 if "mug" in text else None
    server.malformed = lambda text: "handle" in text
    votes = judge(server, retries=1).vote(QUESTIONS)
    assert votes[0].error is None and votes[3].error is None
    assert "HTTP 500" in votes[1].error and server.url in votes[1].error
    assert "malformed JSON" in votes[2].error


def test_an_answer_that_drips_is_cut_at_the_total_timeout(server):
    server.drip_s = 0.05
    t = time.monotonic()
    votes = judge(server, retries=0, total_timeout=0.5, read_timeout=1).vote(QUESTIONS[:1])
    assert "did not arrive within 0.5s" in votes[0].error and time.monotonic() - t < 2


def test_preflight_names_a_wrong_model_and_a_dead_server(server):
    wrong = JudgeConfig(name="j", model="x", engine="openai", openai={**endpoint(server), "model": "other/model"})
    with pytest.raises(ConfigError, match="not served at .*fake/model"):
        preflight(wrong, "judges.0")
    ok = preflight(CaptionerConfig(model="x", engine="openai", openai=endpoint(server)), "captioner")
    assert ok["served_model"] == server.model and ok["hosts"] == [server.url.split("/")[2]]
    server.close()
    with pytest.raises(EngineError, match="does not answer"):
        preflight(CaptionerConfig(model="x", engine="openai", openai=endpoint(server, retries=0)), "captioner")


def test_the_api_key_comes_from_the_environment_and_is_sent(server, monkeypatch):
    with pytest.raises(ConfigError, match="CASLIE_TEST_KEY is not set"):
        captioner(server, api_key_env="CASLIE_TEST_KEY")
    monkeypatch.setenv("CASLIE_TEST_KEY", "sekret")
    c = captioner(server, api_key_env="CASLIE_TEST_KEY")
    assert c.client.headers["Authorization"] == "Bearer sekret"
    assert "sekret" not in json.dumps(CaptionerConfig(model="x", engine="openai", openai=endpoint(server)).model_dump())


def test_config_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="needs an `openai:` section"):
        JudgeConfig(name="j", model="x", engine="openai")
    with pytest.raises(ValueError, match="pool.num_gpus"):
        CaptionerConfig(model="x", engine="openai", openai={"base_url": "http://h:1/v1"}, pool={"num_gpus": 1})
    with pytest.raises(ValueError, match="must be an http"):
        OpenAIEndpoint(base_url="ftp://h/v1")
    assert OpenAIEndpoint(base_url=["http://a/v1/", "http://b/v1"]).base_url == ["http://a/v1", "http://b/v1"]


def test_check_engines_fails_a_logits_judge_without_logprobs_or_falls_back_as_configured(server):
    from caslie_core.models.remote import check_engines

    server.logprobs = False
    said = []
    strict = JudgeConfig(name="j", model="x", mode="logits", engine="openai", openai=endpoint(server))
    with pytest.raises(ConfigError, match=r"judges.0 \(j\): the server at .* returns no logprobs"):
        check_engines(None, [strict], said.append)
    lenient = JudgeConfig(
        name="j", model="x", engine="openai", openai=endpoint(server, logprobs="fallback_to_generate")
    )
    found = check_engines(None, [lenient], said.append)
    assert lenient.mode == "generate" and len(said) == 1 and found["j"]["served_model"] == server.model


def test_the_services_captioner_and_panel_run_on_the_same_engine(server):
    """The service builds its models through the same registry: a Captioner and a Panel deployment (their classes,
    as Serve constructs them) with `engine: openai` caption and vote through the server."""
    import asyncio

    from caslie_core.config.serve import ServeCaptionerConfig, ServeJudgeConfig
    from ray_jobs.serve_models import Captioner, Panel

    cap = ServeCaptionerConfig(model="x", engine="openai", openai=endpoint(server)).model_dump(mode="json")
    judges = [
        ServeJudgeConfig(name=n, model="x", mode=m, engine="openai", openai=endpoint(server)).model_dump(mode="json")
        for n, m in (("a", "logits"), ("b", "generate"))
    ]
    captions = asyncio.run(Captioner.func_or_class(cap).captions([np.zeros((8, 8, 3), np.uint8)] * 2, ["x", "yy"]))
    assert [c["error"] for c in captions] == [None, None] and all(c["caption"] for c in captions)
    votes = asyncio.run(Panel.func_or_class(judges).votes(QUESTIONS))
    assert [{k: v["vote"] for k, v in row.items()} for row in votes] == [
        {"a": judge_says(q), "b": judge_says(q)} for q in QUESTIONS
    ]
