"""The Serve app on the suite's local Ray: real HTTP, real Serve replicas, tiny models, two trained adapters."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from helpers import ROOT, free_port
from imageserver import ImageServer

pytestmark = pytest.mark.slow
KEY = "test-key-123"
IDS = {"rules": "tiny:lm:rules", "cc_only": "tiny:lm:cc_only", "base": "tiny:lm"}  # Ray Serve LLM's BASE:ADAPTER


def _records(catalog: Path, task: str, n: int, split: str = "test") -> list[dict]:
    out = []
    for line in catalog.read_text().splitlines():
        r = json.loads(line)
        if r["task"] == task and r["split"] == split:
            out.append(r)
        if len(out) == n:
            break
    return out


def _request(rec: dict, image_urls: list[str], **extra) -> dict:
    body = {k: rec[k] for k in ("id", "task", "instruction", "input", "options")}
    return {**body, "images": image_urls, **extra}


def _data_uri(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def second_adapter(trained, tmp_path_factory):
    """An adapter trained differently: only on category classification (it answers with option letters)."""
    from helpers import train_config

    from ray_jobs import train

    work = tmp_path_factory.mktemp("trained-cc")
    cfg = train_config(
        trained["catalog"],
        work,
        "run.name=cc-only",
        "data.tasks=[CC]",
        "optim.epochs=3",
        "eval.enabled=false",
        "checkpoint.every_steps=1000",
    )
    summary = train.run(cfg)
    return summary["adapter"]


@pytest.fixture(scope="module")
def images(trained):
    srv = ImageServer(Path(trained["catalog"]).parent / "images")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-store")


@pytest.fixture(scope="module")
def app(ray_session, trained, second_adapter, images, adapter_store):
    from ray import serve

    from caslie_core.config import ServeConfig, load_config
    from ray_jobs.serve import start

    os.environ["CASLIE_TEST_API_KEY"] = KEY
    cfg = load_config(
        ServeConfig,
        ROOT / "configs" / "serve-demo.yaml",
        [
            f"http.port={free_port()}",
            "http.api_key_env=CASLIE_TEST_API_KEY",
            "http.max_body_bytes=65536",
            "http.ingress.max_ongoing_requests=8",
            "http.ingress.max_queued_requests=4",
            f"model.path={trained['cfg'].output.path}",
            "model.name=rules",
            f"model.adapters={{cc_only: {second_adapter}}}",
            f"model.adapter_store={adapter_store}",
            "model.deployment.autoscaling={min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, "
            "upscale_delay_s: 1, downscale_delay_s: 4, look_back_period_s: 2, metrics_interval_s: 0.5}",
            "fetch.allowlist=[localhost]",
            "fetch.retries=0",
            "ray.num_cpus=null",
        ],
    )
    url = start(cfg)
    yield {"url": url, "cfg": cfg, "headers": {"Authorization": f"Bearer {KEY}"}, "catalog": trained["catalog"]}
    serve.shutdown()


def post(app, path, body=None, **kw):
    headers = {**app["headers"], **kw.pop("headers", {})}
    return requests.post(app["url"] + path, json=body, headers=headers, timeout=120, **kw)


def test_predict_and_enrich_with_http_and_data_uri_images(app, trained, images):
    catalog = Path(trained["catalog"])
    rec = _records(catalog, "sequential_recommendation", 1)[0]
    paths = json.loads(rec["images"])
    # first image over HTTP (allowlisted host name), the others as data: URIs
    urls = [f"http://localhost:{images.port}/{Path(paths[0]).name}"] + [_data_uri(p) for p in paths[1:]]
    r = post(app, "/v1/predict", _request(rec, urls))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == rec["id"] and out["model"] == IDS["rules"] and out["status"] == "ok"
    assert len(out["images"]) == len(paths) and [i["index"] for i in out["images"]] == list(range(len(paths)))
    for img in out["images"]:
        assert set(img["votes"]) == {"judge_logits", "judge_generate"} and img["error"] is None
        assert img["kept"] == (
            img["caption"] is not None
            and sum(v == "yes" for v in img["votes"].values()) > sum(v == "no" for v in img["votes"].values())
        )
    assert out["images"][1]["url"].startswith("data:image/jpeg;base64,...")
    assert out["n_kept"] == sum(i["kept"] for i in out["images"])
    assert isinstance(out["answer"], str) and out["usage"]["prompt_tokens"] > 0
    assert set(out["timings_ms"]) == {"fetch", "caption", "judge", "predict", "total"}
    assert images.hits[f"/{Path(paths[0]).name}"] >= 1

    e = post(app, "/v1/enrich", _request(rec, urls))
    assert e.status_code == 200 and "answer" not in e.json()
    assert [i["caption"] for i in e.json()["images"]] == [i["caption"] for i in out["images"]]


def test_requests_and_stage_times_reach_rays_metrics_endpoint(app, trained):
    from helpers import scrape_metrics

    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    assert post(app, "/v1/predict", _request(rec, [_data_uri(p) for p in json.loads(rec["images"])])).status_code == 200
    assert post(app, "/v1/predict", {"task": "CC"}).status_code == 422
    names = [
        "caslie_serve_requests_total",
        "caslie_serve_stage_seconds_bucket",
        "caslie_serve_requests_in_flight",
        "caslie_serve_batch_size_bucket",
    ]

    def complete(found):  # every route/status series exists at zero from the replica's start: wait for values
        stages = " ".join(found["caslie_serve_stage_seconds_bucket"])
        answered = [line for line in found["caslie_serve_requests_total"] if not line.endswith(" 0.0")]
        return all(f'stage="{s}"' in stages for s in ("fetch", "predict")) and len(answered) >= 2

    found = scrape_metrics(names, until=complete)
    assert all(found.values()), {n: len(v) for n, v in found.items()}
    requests_seen = " ".join(line for line in found["caslie_serve_requests_total"] if not line.endswith(" 0.0"))
    assert (
        'route="/v1/predict"' in requests_seen and 'status="200"' in requests_seen and 'status="422"' in requests_seen
    )
    stages = " ".join(found["caslie_serve_stage_seconds_bucket"])
    assert all(f'stage="{s}"' in stages for s in ("fetch", "caption", "judge", "predict"))
    batches = " ".join(found["caslie_serve_batch_size_bucket"])
    assert all(f'model="{m}"' in batches for m in ("captioner", "predictor")) and 'model="judge_' in batches


def test_every_serving_panel_has_data_in_prometheus_during_30_requests(app, trained, prometheus):
    """30 requests, 4 at a time (predict, enrich, the OpenAI route, and a few that fail: 422, 404) while a real
    Prometheus scrapes every 2 s: every serving panel of the shipped dashboard shows them, one-off route and
    status pairs included, and a batch of one reads as one."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import assert_panels_show_data

    recs = _records(Path(trained["catalog"]), "category_classification", 6)
    bodies = [("/v1/predict", _request(r, [_data_uri(p) for p in json.loads(r["images"])])) for r in recs]
    bodies += [("/v1/enrich", _request(recs[0], [_data_uri(json.loads(recs[0]["images"])[0])]))]
    chat = {"model": IDS["rules"], "messages": [{"role": "user", "content": "Is this a mug? Answer yes or no."}]}
    bodies += [("/v1/chat/completions", {**chat, "max_tokens": 4})]
    bodies += [("/v1/predict", {"task": "CC"}), ("/v1/predict", {**bodies[0][1], "adapter": "tiny:lm:no-such"})]
    calls = [bodies[i % len(bodies)] for i in range(30)]
    prometheus.wait_scraped()
    start = time.time()
    # 4 at a time: the ingress queues at most 4 requests (set above for the overload test) and a loaded machine
    # can hold more than that waiting for a replica, which Serve answers with 503
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda c: post(app, c[0], c[1]), calls))
    end = time.time()
    prometheus.wait_scraped()
    codes = Counter(r.status_code for r in replies)
    unexpected = {r.text[:300] for r in replies if r.status_code not in (200, 404, 422)}
    assert codes[200] >= 20 and codes[422] >= 1 and codes[404] >= 1, (codes, unexpected)
    tops = assert_panels_show_data(prometheus, ("Serving:",), start, end)
    p50 = tops["Serving: p50 and p95 requests per model call (batch size), by model"][0]
    assert p50 >= 0.99, tops  # buckets that started at le=1 read a batch of one as 0.5
    seen = prometheus.range(
        "sum by (route, status) (rate(ray_caslie_serve_requests_total[$__rate_interval])) > 0", start, end + 6
    )
    pairs = {(s["metric"]["route"], s["metric"]["status"]) for s in seen}
    assert {("/v1/enrich", "200"), ("/v1/predict", "422"), ("/v1/predict", "404")} <= pairs, pairs


def test_adapters_are_chosen_per_request(app, trained, second_adapter):
    """Each request is answered by the adapter it names: the served answers are exactly what that adapter
    gives offline (PEFT, merged) on the same enriched prompt, and the two adapters, trained differently,
    disagree. Requests alternate between adapters so that one replica serves both in turn."""
    from caslie_core.models.predictor import Predictor
    from caslie_core.prompts import instruction_prompt

    recs = _records(Path(trained["catalog"]), "answerability_prediction", 8)
    served: dict = {"rules": [], "cc_only": [], "base": []}
    prompts = []
    for rec in recs:
        for adapter in served:
            r = post(
                app, "/v1/predict", _request(rec, [_data_uri(p) for p in json.loads(rec["images"])], adapter=adapter)
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == IDS[adapter]  # asked by its short name, answered under its id
            served[adapter].append(r.json()["raw_output"])
        out = r.json()
        prompts.append(instruction_prompt(rec["instruction"], out["input"], out["options"], style="alpaca"))
    cap = app["cfg"].model.max_new_tokens
    offline = {
        "rules": Predictor("tiny:lm", adapter=f"{trained['cfg'].output.path}/adapter", max_new_tokens=cap),
        "cc_only": Predictor("tiny:lm", adapter=second_adapter, max_new_tokens=cap),
        "base": Predictor("tiny:lm", max_new_tokens=cap),
    }
    for name, predictor in offline.items():
        assert [a.raw for a in predictor.answer(prompts)] == served[name], name
    assert sum(a != b for a, b in zip(served["rules"], served["cc_only"])) >= len(recs) // 2, served


def _chat(trained) -> list[dict]:
    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    img = _data_uri(json.loads(rec["images"])[0])
    return [
        {"role": "system", "content": "You classify products."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Which category fits {rec['input']}?"},
                {"type": "image_url", "image_url": {"url": img}},
            ],
        },
    ]


def _texts(trained, n: int) -> list[list[dict]]:
    """Text-only chats (no images: they go straight to the model)."""
    recs = _records(Path(trained["catalog"]), "answerability_prediction", n)
    return [[{"role": "user", "content": f"{r['instruction']} {r['input']}"}] for r in recs]


def _client(app):
    from openai import OpenAI

    return OpenAI(base_url=app["url"] + "/v1", api_key=KEY, max_retries=0)


def test_openai_sdk_lists_retrieves_answers_and_gets_openai_errors(app, trained):
    from openai import BadRequestError, NotFoundError

    client = _client(app)
    models = {m.id: m for m in client.models.list()}
    assert set(models) >= set(IDS.values())
    rules = client.models.retrieve(IDS["rules"])
    assert rules.owned_by == "caslie" and rules.model_extra["parent"] == rules.model_extra["root"] == "tiny:lm"
    assert "parent" not in client.models.retrieve("tiny:lm").model_extra
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("tiny:lm:nope")
    assert e.value.code == "model_not_found"

    messages = _chat(trained)
    done = client.chat.completions.create(model=IDS["rules"], messages=messages, max_tokens=4)
    assert done.model == IDS["rules"] and done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str)
    assert done.usage.completion_tokens <= 4 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason in ("stop", "length")
    short = client.chat.completions.create(model="rules", messages=messages, max_completion_tokens=4)  # alias
    assert short.model == IDS["rules"] and short.choices[0].message.content == done.choices[0].message.content

    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=messages)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    refused = [
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"temperature": 5}, "temperature"),
    ]
    for kwargs, param in refused:
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model=IDS["rules"], messages=messages, **kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
        assert e.value.type == "invalid_request_error"
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=IDS["rules"], messages=[{"role": "robot", "content": "x"}])
    assert e.value.param == "messages[0].role"


def test_streaming_sends_tokens_as_they_come_with_usage_last(app, trained):
    """The base model's 16-token answers, streamed: the pieces add up to the non-streamed answer, arrive in
    several chunks (the replica streams tokens; before, one chunk carried the whole answer), finish once and end
    with the usage chunk that `stream_options.include_usage` asks for (choices empty, as OpenAI sends it)."""
    client = _client(app)
    pieces = 0
    for messages in _texts(trained, 4):
        done = client.chat.completions.create(model=IDS["base"], messages=messages)
        chunks = list(
            client.chat.completions.create(
                model=IDS["base"], messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == done.choices[0].message.content
        pieces += len(deltas)
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [done.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == done.usage.model_dump()
        assert len({c.id for c in chunks}) == 1
        plain = list(client.chat.completions.create(model=IDS["base"], messages=messages, stream=True))
        assert all(c.usage is None for c in plain)  # no usage chunk unless asked
    assert pieces > 8, pieces  # 4 answers of 16 tokens: more than two pieces each on average


def test_sampling_parameters_are_honoured(app, trained):
    client = _client(app)
    messages = _texts(trained, 1)[0]

    def ask(**kw):
        r = client.chat.completions.create(model=IDS["base"], messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    greedy = ask()
    assert ask() == greedy and ask(temperature=0) == greedy  # no temperature: the method's greedy decoding
    assert ask(temperature=1.0, seed=7) == ask(temperature=1.0, seed=7)  # a seeded draw repeats
    assert len({ask(temperature=1.5, seed=k)[0] for k in range(5)}) > 1  # sampling varies with the seed
    assert ask(temperature=1.0, top_p=1e-6)[0] == greedy[0]  # only the likeliest token survives top_p
    words = greedy[0].split()
    assert len(words) >= 3, greedy
    text, finish, _ = ask(stop=[words[1]])
    assert text == greedy[0].split(words[1], 1)[0].strip() and finish == "stop"
    text, finish, n = ask(max_tokens=3)
    assert n <= 3 and greedy[0].startswith(text) and finish == ("length" if n == 3 else "stop")


def test_text_completions(app, trained):
    client = _client(app)
    prompts = [m[0]["content"] + "\n\n### Response:\n" for m in _texts(trained, 3)]
    one = client.completions.create(model=IDS["rules"], prompt=prompts[0], max_tokens=8)
    assert one.object == "text_completion" and one.model == IDS["rules"] and len(one.choices) == 1
    assert isinstance(one.choices[0].text, str) and one.usage.prompt_tokens > 0
    many = client.completions.create(model=IDS["rules"], prompt=prompts, max_tokens=8)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].text == one.choices[0].text
    streamed = list(client.completions.create(model=IDS["rules"], prompt=prompts[0], max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == one.choices[0].text


def test_async_client_concurrent_and_streaming(app, trained):
    import asyncio

    from openai import AsyncOpenAI

    chats = _texts(trained, 4)
    sync = [
        _client(app).chat.completions.create(model=IDS["base"], messages=m).choices[0].message.content for m in chats
    ]

    async def main():
        client = AsyncOpenAI(base_url=app["url"] + "/v1", api_key=KEY, max_retries=0)
        async with client:
            answers = await asyncio.gather(
                *(client.chat.completions.create(model=IDS["base"], messages=m) for m in chats)
            )
            stream = await client.chat.completions.create(model=IDS["base"], messages=chats[0], stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return [a.choices[0].message.content for a in answers], streamed

    answers, streamed = asyncio.run(main())
    assert answers == sync and streamed == sync[0]


def test_langchain_chat_openai_unmodified(app, trained):
    import openai
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=IDS["rules"], base_url=app["url"] + "/v1", api_key=KEY, max_tokens=4, stream_usage=True, max_retries=0
    )
    chat = _chat(trained)
    messages = [SystemMessage(chat[0]["content"]), HumanMessage(chat[1]["content"])]
    msg = llm.invoke(messages)
    assert isinstance(msg.content, str) and 0 < msg.usage_metadata["output_tokens"] <= 4
    chunks = list(llm.stream(messages))
    assert "".join(c.content for c in chunks) == msg.content
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.usage_metadata == msg.usage_metadata  # token accounting from the usage chunk
    with pytest.raises(openai.BadRequestError, match="tools"):
        llm.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]).invoke("hi")


def test_curl_streams_server_sent_events(app, trained):
    import subprocess

    body = {"model": IDS["base"], "messages": _texts(trained, 1)[0], "stream": True}
    base = ["curl", "-sS", "-N", "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"]
    out = subprocess.run(
        [*base, "-d", json.dumps(body), app["url"] + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 4
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])
    out = subprocess.run(
        [*base, "-w", "\n%{http_code}", "-d", json.dumps({**body, "n": 3}), app["url"] + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    payload, code = out.rsplit("\n", 1)
    assert code == "400" and json.loads(payload)["error"]["param"] == "n"


def test_a_new_adapter_in_the_store_is_served_without_a_redeploy(app, trained, second_adapter, adapter_store):
    import shutil

    rec = _records(Path(trained["catalog"]), "answerability_prediction", 1)[0]
    body = _request(rec, [_data_uri(p) for p in json.loads(rec["images"])])
    known = post(app, "/v1/predict", {**body, "adapter": "cc_only"}).json()["raw_output"]
    assert post(app, "/v1/predict", {**body, "adapter": "tiny:lm:fresh"}).status_code == 404
    shutil.copytree(second_adapter, adapter_store / "fresh")  # the same weights as cc_only, under a new name
    time.sleep(1.1)  # the store is listed again at most once a second
    r = post(app, "/v1/predict", {**body, "adapter": "tiny:lm:fresh"})
    assert r.status_code == 200 and r.json()["model"] == "tiny:lm:fresh" and r.json()["raw_output"] == known
    card = _client(app).models.retrieve("tiny:lm:fresh")
    assert card.model_extra["parent"] == "tiny:lm" and "tiny:lm:fresh" in {m.id for m in _client(app).models.list()}


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_service(app, trained):
    body = {"model": IDS["base"], "messages": _texts(trained, 1)[0], "stream": True}
    for _ in range(3):
        with requests.post(
            app["url"] + "/v1/chat/completions", json=body, headers=app["headers"], stream=True, timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then the client hangs up
    done = _client(app).chat.completions.create(model=IDS["base"], messages=body["messages"])
    assert done.choices[0].message.content is not None
    assert requests.get(app["url"] + "/healthz?deep=true", timeout=30).json()["status"] == "ok"


def test_the_service_captions_votes_and_keeps_as_the_batch_job_does(app, trained):
    """The same records through the batch job's stages (in this process, on the Serve config's own models) and
    through the running service: per image the same caption, votes, vote errors, kept flag and error. The other
    layouts are held to the split one's images below."""
    from caslie_core.enrichment import stages
    from caslie_core.images import FetchPolicy
    from caslie_core.models.captioner import Captioner
    from caslie_core.models.judge import Judge

    cfg, catalog = app["cfg"], Path(trained["catalog"])
    recs = _records(catalog, "category_classification", 2) + _records(catalog, "sequential_recommendation", 1)
    size = cfg.captioner.image_size
    table = stages.prepare(
        [{"text": json.dumps(r)} for r in recs],
        policy=FetchPolicy(allow_local_files=True),
        threads=2,
        max_pixels=10**7,
        size=size,
    )
    out = stages.CaptionStage(Captioner.from_config(cfg.captioner), size)(table)
    for j in cfg.judges:
        out = stages.JudgeStage(Judge.from_config(j), j.name, judge_missing=j.reply == "research")(out)
    written = stages.finalize(out, provenance={"cqe_vote": cfg.cqe.vote})
    for rec, row in zip(recs, written):
        served = post(app, "/v1/enrich", _request(rec, [_data_uri(p) for p in json.loads(rec["images"])]))
        assert served.status_code == 200, served.text
        images = served.json()["images"]
        assert len(images) == len(row["image_results"]) > 0
        for img, res in zip(images, row["image_results"]):
            assert img["caption"] == res["caption"]
            assert img["votes"] == {v["judge"]: v["vote"] for v in res["votes"]}
            assert img["vote_errors"] == {v["judge"]: v["error"] for v in res["votes"] if v["error"]}
            assert img["kept"] == res["kept"] and img["error"] == res["error"]


@pytest.mark.parametrize("layout", ["colocated", "panel", "single"])
def test_other_layouts_answer_exactly_as_the_split_one(app, trained, layout):
    """The same app with the judges in one Panel replica, every model in one Models replica, or every model in the
    ingress's own replica (fewer calls per request, none in `single`): the same captions, votes and answers as the
    split layout, for a record and for a chat, streamed or not, with the adapter each request names."""
    from ray import serve

    from ray_jobs.serve import build_app

    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    body = _request(rec, [_data_uri(p) for p in json.loads(rec["images"])])
    chat = {"model": IDS["rules"], "messages": _chat(trained)}
    split = post(app, "/v1/predict", body).json()
    split_chat = post(app, "/v1/chat/completions", chat).json()
    cfg = app["cfg"].model_copy(
        update={
            "layout": layout,
            "panel": app["cfg"].panel.model_copy(update={"num_cpus": 0.1}),
            "model": app["cfg"].model.model_copy(
                update={"deployment": app["cfg"].model.deployment.model_copy(update={"num_cpus": 0.1})}
            ),
        }
    )
    name = f"caslie-{layout}"
    serve.run(build_app(cfg), name=name, route_prefix=f"/{layout}")
    try:
        other = post(app, f"/{layout}/v1/predict", body)
        assert other.status_code == 200, other.text
        other = other.json()
        for key in ("answer", "raw_output", "status", "model", "n_kept", "input"):
            assert other[key] == split[key], key
        same = ("caption", "votes", "vote_errors", "kept", "error")  # one caption-and-vote rule in every layout
        assert [[i[k] for k in same] for i in other["images"]] == [[i[k] for k in same] for i in split["images"]]
        assert {"fetch", "caption", "judge", "predict", "total"} <= set(other["timings_ms"])
        named = {**body, "adapter": "cc_only"}  # colocated and single: the whole record in one call, this adapter
        assert (
            post(app, f"/{layout}/v1/predict", named).json()["raw_output"]
            == (post(app, "/v1/predict", named).json()["raw_output"])
        )
        c = post(app, f"/{layout}/v1/chat/completions", chat).json()
        assert c["choices"][0]["message"] == split_chat["choices"][0]["message"]
        # the cap and a seeded draw reach the model (the untuned one: flat enough that a draw is not greedy's pick)
        short = {**chat, "model": IDS["base"], "max_tokens": 3, "temperature": 1.0, "seed": 7}
        got, want = (post(app, f"{prefix}/v1/chat/completions", short).json() for prefix in (f"/{layout}", ""))
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] <= 3
        assert got["choices"][0] == want["choices"][0]
        assert c["caslie"]["images"] == split_chat["caslie"]["images"]
        for model in (IDS["rules"], IDS["cc_only"]):  # streamed, per adapter: the answer split gives
            want = post(app, "/v1/chat/completions", {**chat, "model": model}).json()["choices"][0]["message"]
            streamed = (
                _client(app)
                .with_options(base_url=f"{app['url']}/{layout}/v1")
                .chat.completions.create(model=model, messages=chat["messages"], stream=True)
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == want["content"]
        for _ in range(2):  # clients that hang up mid-stream: their generation ends, the next answer is intact
            url = f"{app['url']}/{layout}/v1/chat/completions"
            with requests.post(
                url, json={**chat, "stream": True}, headers=app["headers"], stream=True, timeout=60
            ) as r:
                assert r.status_code == 200
                next(r.iter_lines())
        again = post(app, f"/{layout}/v1/chat/completions", chat).json()
        assert again["choices"][0]["message"] == split_chat["choices"][0]["message"]
        health = requests.get(f"{app['url']}/{layout}/healthz", params={"deep": "true"}, timeout=60).json()
        expected = {"Captioner", "Panel", "Predictor"} if layout == "panel" else {"Models"}
        assert set(health["deployments"]) == expected and health["status"] == "ok"
    finally:
        serve.delete(name)


def test_bad_input_gets_clear_errors_and_the_service_stays_up(app, trained, images):
    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    good = _request(rec, [_data_uri(json.loads(rec["images"])[0])])

    r = requests.post(app["url"] + "/v1/predict", data=b'{"task": ', headers=app["headers"], timeout=30)
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"][0]["msg"]
    r = post(app, "/v1/predict", {k: v for k, v in good.items() if k != "instruction"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "instruction"]
    r = post(app, "/v1/predict", {**good, "task": "XX"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "task"]
    assert "unknown task" in r.json()["detail"][0]["msg"]
    r = post(app, "/v1/predict", {**good, "images": []})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "images"]
    r = post(app, "/v1/predict", {**good, "adapter": "nope"})
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    r = post(app, "/v1/predict", {**good, "images": ["data:image/png;base64," + "A" * 100_000]})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = post(app, "/v1/predict", {**good, "images": ["data:image/png;base64," + base64.b64encode(b"hello").decode()]})
    assert r.status_code == 422 and "not an image" in r.json()["detail"][0]["msg"]
    assert r.json()["detail"][0]["loc"] == ["body", "images", 0]
    r = post(app, "/v1/predict", {**good, "images": ["file:///etc/passwd"]})
    assert r.status_code == 422 and "not allowed" in r.json()["detail"][0]["msg"]

    # the test's own server on 127.0.0.1, not allowlisted (only the name `localhost` is): refused unseen
    before = sum(images.hits.values())
    r = post(app, "/v1/predict", {**good, "images": [f"{images.url}/{Path(json.loads(rec['images'])[0]).name}"]})
    assert r.status_code == 422 and "loopback" in r.json()["detail"][0]["msg"]
    assert sum(images.hits.values()) == before

    # skip mode answers without the caption, as the batch job would (status partial)
    r = post(app, "/v1/predict", {**good, "images": [f"{images.url}/x.png"], "image_errors": "skip"})
    assert r.status_code == 200 and r.json()["status"] == "partial"
    assert r.json()["images"][0]["error"]["stage"] == "fetch" and r.json()["n_kept"] == 0

    r = post(app, "/v1/predict", {**good, "timeout_s": 0.001})
    assert r.status_code == 504 and "deadline" in r.json()["detail"]
    r = requests.post(app["url"] + "/v1/predict", json=good, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.post(app["url"] + "/v1/predict", json=good, headers={"X-API-Key": "wrong"}, timeout=30)
    assert r.status_code == 401

    assert requests.get(app["url"] + "/healthz?deep=true", timeout=30).json()["status"] == "ok"
    assert post(app, "/v1/predict", good).status_code == 200


@contextlib.contextmanager
def _under_load(app, clients: int):
    """`clients` threads posting one CC record back to back inside the block; yields the status counts."""
    rec = _records(Path(app["catalog"]), "category_classification", 1)[0]
    body = _request(rec, [_data_uri(json.loads(rec["images"])[0])])
    stop, codes = threading.Event(), Counter()

    def loop():
        while not stop.is_set():
            try:
                codes[post(app, "/v1/predict", body).status_code] += 1
            except requests.RequestException as e:
                codes[type(e).__name__] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield codes
    finally:
        stop.set()
        for t in threads:
            t.join()


def _replicas(name: str) -> int:
    from ray import serve

    app = serve.status().applications["caslie"]
    return app.deployments[name].replica_states.get("RUNNING", 0)


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_overload_gets_503_with_retry_after(app, trained):
    from concurrent.futures import ThreadPoolExecutor

    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    body = _request(rec, [_data_uri(json.loads(rec["images"])[0])])
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda _: post(app, "/v1/predict", body), range(48)))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes[503] >= 1 and codes[200] >= 8, codes
    assert all(r.headers.get("Retry-After") == "2" for r in responses if r.status_code == 503)
    assert post(app, "/v1/predict", body).status_code == 200


def test_autoscaling_up_under_load_and_back(app):
    with _under_load(app, 6) as codes:
        _wait(lambda: _replicas("Predictor") >= 2, 90, "the Predictor to scale to 2 replicas")
    assert codes[200] > 0 and set(codes) <= {200, 503}, codes
    _wait(lambda: _replicas("Predictor") == 1, 90, "the Predictor to scale back to 1 replica")


def test_killed_replica_recovers_without_manual_action(app):
    import ray

    with _under_load(app, 3) as codes:
        _wait(lambda: codes[200] >= 3, 60, "requests to flow")
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Predictor#" in a["name"]]
        assert names, "no Predictor replica found"
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        served_before = codes[200]
        _wait(lambda: codes[200] >= served_before + 5, 90, "requests to be served again after the kill")
    assert set(codes) <= {200}, codes
    _wait(lambda: _replicas("Predictor") >= 1, 60, "a replacement Predictor replica")


def test_a_tuning_change_reaches_running_replicas_without_restarting_them(app):
    """The Serve config file's own `deployments:` section (what `serve deploy` and a RayService apply) changes
    batching (user_config -> reconfigure) and autoscaling bounds on a running app: the model replicas stay the
    same processes (same replica ids, no model reloaded) and the new settings take effect."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    name = "caslie-live"
    names = ["Captioner", "Predictor"] + [f"Judge_{j.name}" for j in app["cfg"].judges]
    application = {
        "name": name,
        "route_prefix": "/live",
        "import_path": "ray_jobs.serve:build_app",
        "args": app["cfg"].model_dump(mode="json"),
        "runtime_env": {"env_vars": {"CASLIE_TEST_API_KEY": KEY}},  # the app is built on the cluster
    }

    def deploy(deployments):
        config = {"applications": [{**application, "deployments": deployments}]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        return {n: serve.get_deployment_handle(n, app_name=name).state.remote().result() for n in names}

    judge = f"Judge_{app['cfg'].judges[0].name}"

    def tuning(captioner_batch, judge_wait, predictor_batch, predictor_max):
        # The section lists the same keys from the first deploy on: Serve hashes which deployments set an
        # autoscaling_config into the app's code version, so adding one later would be a code change.
        return [
            {"name": "Captioner", "user_config": {"batching": {"max_batch_size": captioner_batch}}},
            {"name": judge, "user_config": {"batching": {"wait_timeout_s": judge_wait}}},
            {
                "name": "Predictor",
                "user_config": {"batching": {"max_batch_size": predictor_batch}},
                "autoscaling_config": {"min_replicas": 1, "max_replicas": predictor_max},
            },
        ]

    try:
        before = deploy(tuning(16, 0.01, 16, 2))
        assert before["Captioner"]["batching"]["max_batch_size"] == 16
        after = deploy(tuning(3, 0.05, 5, 3))
        assert {n: s["replica"] for n, s in after.items()} == {n: s["replica"] for n, s in before.items()}
        assert after["Captioner"]["batching"]["max_batch_size"] == 3
        assert after[judge]["batching"]["wait_timeout_s"] == 0.05
        assert after["Predictor"]["batching"]["max_batch_size"] == 5
        status = serve.status().applications[name].deployments["Predictor"]
        assert status.status == "HEALTHY"
        r = requests.get(app["url"] + "/live/healthz", params={"deep": "true"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        serve.delete(name)
