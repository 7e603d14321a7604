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
def app(ray_session, trained, second_adapter, images):
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
    assert out["id"] == rec["id"] and out["model"] == "rules" and out["status"] == "ok"
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
    names = ["caslie_serve_requests_total", "caslie_serve_stage_seconds_bucket", "caslie_serve_requests_in_flight"]
    found = scrape_metrics(names)
    assert all(found.values()), {n: len(v) for n, v in found.items()}
    requests_seen = " ".join(found["caslie_serve_requests_total"])
    assert (
        'route="/v1/predict"' in requests_seen and 'status="200"' in requests_seen and 'status="422"' in requests_seen
    )
    stages = " ".join(found["caslie_serve_stage_seconds_bucket"])
    assert all(f'stage="{s}"' in stages for s in ("fetch", "caption", "judge", "predict"))


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
            assert r.json()["model"] == adapter
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


def test_openai_client(app, trained):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=app["url"] + "/v1", api_key=KEY)
    assert {m.id for m in client.models.list()} == {"rules", "cc_only", "base"}
    rec = _records(Path(trained["catalog"]), "category_classification", 1)[0]
    img = _data_uri(json.loads(rec["images"])[0])
    messages = [
        {"role": "system", "content": "You classify products."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Which category fits {rec['input']}?"},
                {"type": "image_url", "image_url": {"url": img}},
            ],
        },
    ]
    done = client.chat.completions.create(model="rules", messages=messages, max_tokens=4)
    assert done.model == "rules" and done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str)
    assert done.usage.completion_tokens <= 4 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(model="rules", messages=messages, max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == done.choices[0].message.content  # greedy: the same answer, in one chunk
    with pytest.raises(NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-nope", messages=messages)


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
    assert r.status_code == 404 and "unknown model" in r.json()["detail"]
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
