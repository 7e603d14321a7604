"""Hostile clients against the real service (Serve on the suite's Ray, real HTTP on 127.0.0.1, tiny models):
slow image hosts, slow and idle request bodies, image bombs, malformed and fuzzed requests, oversized headers,
docs behind the key. After each attack an ordinary request is answered within its own deadline."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import requests
from helpers import ROOT, free_port
from hostile import TrickleHost, eps_file, ico_with_big_png, png16
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow
KEY = "adversarial-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png_uri(data: bytes | None = None) -> str:
    if data is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, "PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def record(images: list[str], **extra) -> dict:
    return {
        "task": "CC",
        "instruction": "Given a product, choose the product's category from the options.",
        "input": {"title": "Acme 1234"},
        "options": ["A: tools", "B: toys", "C: books", "D: garden"],
        "images": images,
        **extra,
    }


def sr_record(images: list[str], **extra) -> dict:
    """A sequential-recommendation record: one picture per history item and per option (3 options)."""
    return {
        "task": "SR",
        "instruction": "Given the user's purchase history, choose the product they will buy next.",
        "input": [f"{i + 1}: item {i}" for i in range(len(images) - 3)],
        "options": ["A: a", "B: b", "C: c"],
        "images": images,
        **extra,
    }


@pytest.fixture(scope="module")
def trickle():
    host = TrickleHost(every_s=0.5)
    yield host
    host.close()


@pytest.fixture(scope="module")
def app(ray_session):
    from ray import serve

    from caslie_core.config import ServeConfig, load_config
    from ray_jobs.serve import start

    os.environ["CASLIE_ADVERSARIAL_KEY"] = KEY
    cfg = load_config(
        ServeConfig,
        ROOT / "configs" / "serve-demo.yaml",
        [
            f"http.port={free_port()}",
            "http.api_key_env=CASLIE_ADVERSARIAL_KEY",
            "http.body_timeout_s=2",
            "http.request_timeout_s=20",
            "http.ingress.max_ongoing_requests=64",
            "http.ingress.max_queued_requests=64",
            "model.path=null",
            "model.model=tiny:lm",
            "model.name=tiny",
            "model.serve_base=false",
            "fetch.allowlist=[127.0.0.1/32]",
            "fetch.retries=0",
            "fetch.total_timeout=60",  # long on purpose: the request's deadline is what must stop a fetch
            "fetch.threads=8",
            "fetch.per_request=4",
            "ray.num_cpus=null",
        ],
    )
    url = start(cfg)
    yield {"url": url, "cfg": cfg}
    serve.shutdown()


def post(app, path: str, body=None, *, data: bytes | None = None, timeout: float = 60, **kw) -> requests.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    if data is not None:
        headers["Content-Type"] = "application/json"
        return requests.post(app["url"] + path, data=data, headers=headers, timeout=timeout, **kw)
    return requests.post(app["url"] + path, json=body, headers=headers, timeout=timeout, **kw)


def ordinary(app) -> requests.Response:
    """What a well-behaved client sends (a data: image), with its own 15 s deadline."""
    r = post(app, "/v1/predict", record([_png_uri()], timeout_s=15), timeout=20)
    assert r.status_code == 200, r.text
    return r


def test_a_slow_image_host_stalls_only_its_own_requests(app, trickle):
    """Four requests with 16 trickling URLs each: each ends at its deadline (504) and its fetches are cancelled
    (the host sees every connection closed); an ordinary request sent meanwhile is answered."""
    ordinary(app)
    urls = [f"{trickle.url}/img{i}.png" for i in range(16)]
    with cf.ThreadPoolExecutor(5) as pool:
        slow = [pool.submit(post, app, "/v1/predict", sr_record(urls, timeout_s=4), timeout=30) for _ in range(4)]
        time.sleep(1.0)  # the trickles hold the fetch threads now
        assert trickle.open > 0
        ordinary(app)
        answers = [f.result() for f in slow]
    assert [r.status_code for r in answers] == [504] * 4, [r.text for r in answers]
    assert all("fetching images" in r.json()["detail"] for r in answers)
    assert trickle.wait_closed(5) == 0  # cancelled, not left trickling into a thread
    ordinary(app)


def _raw(app, head: bytes) -> socket.socket:
    port = int(app["url"].rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(head)
    return s


def _post_head(length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_and_idle_request_bodies_get_408_and_do_not_take_the_api_down(app):
    trickling = [_raw(app, _post_head(1000) + b'{"task"') for _ in range(40)]
    idle = _raw(app, _post_head(1000) + b"{")
    t = time.monotonic()
    for _ in range(3):  # trickle a byte a second on 40 connections while others use the API
        time.sleep(0.7)
        for s in trickling:
            s.sendall(b" ")
    ordinary(app)
    assert requests.get(app["url"] + "/healthz", timeout=10).status_code == 200
    for s in [*trickling, idle]:
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        s.close()
    assert time.monotonic() - t < 15  # answered at their body deadline (2 s), not left open
    ordinary(app)


def _ingress_rss() -> tuple[int, int]:
    """(current RSS, peak RSS) in MB of the ingress replica's process."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if b"ServeReplica:caslie:Ingress" not in cmd:
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024
    pytest.skip("the ingress replica's process was not found")


def test_image_bombs_cost_the_ingress_little_memory(app):
    """Eight 16-bit 6324x6324 PNGs in one request (0.7 MB) took the ingress from 271 MB to 5 GB before."""
    rss, _ = _ingress_rss()
    bomb = _png_uri(png16(6324, 6324))
    r = post(app, "/v1/enrich", record([bomb]))
    assert r.status_code == 200, r.text[:300]
    r = post(app, "/v1/enrich", sr_record([bomb] * 8))  # one request, eight of them
    assert r.status_code == 200, r.text[:300]
    _, peak = _ingress_rss()
    assert peak - rss < 700, (rss, peak)
    for data in (ico_with_big_png(), eps_file()):
        r = post(app, "/v1/enrich", record([_png_uri(data)]))
        assert r.status_code == 422 and "accepted format" in r.text
    ordinary(app)


def _deep(n: int) -> bytes:
    return b'{"task": "CC", "input": ' + b"[" * n + b"]" * n + b"}"


MALFORMED = {
    "NaN in input": json.dumps(record([_png_uri()])).replace('"Acme 1234"', "NaN").encode(),
    "Infinity": json.dumps(record([_png_uri()], timeout_s=1)).replace("1}", "Infinity}").encode(),
    "27 options": json.dumps(record([_png_uri()]) | {"options": [f"o{i}" for i in range(27)]}).encode(),
    "nested 100,000 deep": _deep(100_000),
    "nested 500 deep": _deep(500),
    "5,000-digit integer": json.dumps(record([_png_uri()])).replace('"Acme 1234"', "9" * 5000).encode(),
    "port 99999": json.dumps(record(["http://example.com:99999/x.png"])).encode(),
    "broken IPv6 URL": json.dumps(record(["http://[::1/x"])).encode(),
    "not JSON": b"\xff\xfe{",
    "a list": b"[1, 2]",
    "garbage GIF": json.dumps(record([_png_uri(b"GIF89a" + b"\x00" * 40)])).encode(),
    "garbage JPEG": json.dumps(record([_png_uri(b"\xff\xd8\xff\xe0" + b"\x01" * 60)])).encode(),
    "DDS header": json.dumps(record([_png_uri(b"DDS " + b"\x7c\x00\x00\x00" + b"\x00" * 120)])).encode(),
    "BLP header": json.dumps(record([_png_uri(b"BLP2" + b"\x01\x00\x00\x00" * 40)])).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_a_clean_4xx(app, case):
    r = post(app, "/v1/predict", data=MALFORMED[case])
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "Traceback" not in r.text and "Error:" not in r.text.replace("JSONDecodeError", "")


def test_skipped_broken_urls_are_the_images_errors(app):
    body = record(["http://example.com:99999/x.png"], image_errors="skip")
    r = post(app, "/v1/predict", body)
    assert r.status_code == 200 and r.json()["status"] == "partial"
    assert "malformed URL" in r.json()["images"][0]["error"]["message"]


def test_a_chat_image_url_that_is_not_a_string_is_a_400_class_error(app):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 12}}]}],
    }
    r = post(app, "/v1/chat/completions", body)
    assert 400 <= r.status_code < 500 and "image_url.url must be a string" in r.text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_field = st.sampled_from(["task", "instruction", "input", "options", "images", "image_errors", "timeout_s", "id"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(_field, _json, max_size=4), drop=st.lists(_field, max_size=2))
def test_fuzzed_request_bodies_never_get_a_5xx(app, changes, drop):
    body = {**record([_png_uri()], timeout_s=10), **changes}
    for k in drop:
        body.pop(k, None)
    r = post(app, "/v1/predict", body, timeout=30)
    asked = body.get("timeout_s")
    short = isinstance(asked, int | float) and not isinstance(asked, bool) and 0 < asked < 5
    if short and r.status_code == 504:  # the client asked for a deadline too short to answer in: its own 504
        assert "deadline" in r.json()["detail"]
        return
    assert r.status_code < 500, (body, r.status_code, r.text[:300])


def test_oversized_headers_are_refused(app):
    r = requests.get(app["url"] + "/v1/models", headers={**AUTH, "X-Big": "a" * 40_000}, timeout=10)
    assert r.status_code in (400, 431)
    assert requests.get(app["url"] + "/v1/models", headers=AUTH, timeout=10).status_code == 200


def test_docs_are_behind_the_key(app):
    assert requests.get(app["url"] + "/openapi.json", timeout=10).status_code == 401
    spec = requests.get(app["url"] + "/openapi.json", headers=AUTH, timeout=10)
    assert spec.status_code == 200 and "/v1/predict" in spec.json()["paths"]
    assert requests.get(app["url"] + "/docs", headers=AUTH, timeout=10).status_code == 404
    assert requests.get(app["url"] + "/redoc", timeout=10).status_code == 404
