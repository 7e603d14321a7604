"""`engine: openai`: the enrichment job's captioner and judges on OpenAI-compatible servers, on a real local Ray.

Against `transformers serve` (an OpenAI-compatible server written by others, serving this project's tiny models on
CPU): the same captions, votes and kept flags as the in-actor `hf` engine on the same models (greedy), and a
logits judge refused at start or falling back to generate as configured (that server gives no logprobs). Against
the tests' own server (`openaiserver.FakeOpenAI`): a 500 or a malformed answer is that image's error, every
record is written, and a server that dies mid-run stops the job with a message naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import ROOT, free_port
from openaiserver import FakeOpenAI

from caslie_core.config import EnrichConfig, load_config
from caslie_core.errors import CaslieError, ConfigError
from caslie_core.io import store
from caslie_core.models.tiny import ensure_tiny_models
from caslie_core.synthetic import write_catalog
from ray_jobs import enrich

pytestmark = pytest.mark.slow
DEMO = str(ROOT / "configs" / "enrich-demo.yaml")
POOL = "{min_size: 1, max_size: 1, num_cpus: 0.25, batch_size: 16}"


def config(inp, out, *extra):
    return load_config(EnrichConfig, DEMO, [f"input.path={inp}", f"output.path={out}", *extra])


@pytest.fixture(scope="module")
def served():
    """`transformers serve` for the tiny captioner and the tiny language model, each on its own port."""
    paths = ensure_tiny_models()
    procs, urls = [], {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).with_name("transformers"))
    for name in ("captioner", "lm"):
        port = free_port()
        cmd = [exe, "serve", paths[name], "--host", "127.0.0.1", "--port", str(port)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls[name] = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        for name, url in urls.items():
            while True:
                try:
                    if requests.get(f"{url}/models", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, f"transformers serve for {name} did not start"
                time.sleep(0.5)
        yield {"urls": urls, "paths": paths}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _judges(engine: str, served: dict, logits: str | None = None) -> str:
    """A generate judge (in the actor, or on the server) and, with `logits`, a second judge: on the server a logits
    judge (`openai.logprobs: logits`), in the actor what that judge becomes when the server has no logprobs and it
    falls back (a generate judge of 16 tokens), so that both runs ask the same questions the same way."""
    lm = f"base_url: {served['urls']['lm']}, model: {served['paths']['lm']}"
    on_server = f", engine: openai, openai: {{{lm}}}" if engine == "openai" else ""
    judges = [f"{{name: judge_generate, model: 'tiny:lm', mode: generate, max_new_tokens: 4, pool: {POOL}{on_server}}}"]
    if logits and engine == "openai":
        remote = f"engine: openai, openai: {{{lm}, logprobs: {logits}}}"
        judges.append(f"{{name: judge_logits, model: 'tiny:lm', mode: logits, pool: {POOL}, {remote}}}")
    elif logits:
        judges.append(f"{{name: judge_logits, model: 'tiny:lm', mode: generate, max_new_tokens: 16, pool: {POOL}}}")
    return "judges=[" + ", ".join(judges) + "]"


def _captioner_on(url: str, model: str) -> list[str]:
    return ["captioner.engine=openai", f"captioner.openai={{base_url: {url}, model: {model}, max_concurrency: 8}}"]


def _by_id(out) -> dict:
    return {r["id"]: r for r in store.read_output(str(out))}


def test_enrichment_through_transformers_serve_equals_the_in_actor_engine(ray_session, served, tmp_path):
    m = write_catalog(tmp_path / "cat", 12, seed=31, tasks=["CC", "PRP"], broken_images=1)
    hf = tmp_path / "hf"
    enrich.run(config(m["jsonl"], hf, _judges("hf", served, logits="fallback_to_generate"), f"captioner.pool={POOL}"))
    remote = tmp_path / "remote"
    cap = _captioner_on(served["urls"]["captioner"], served["paths"]["captioner"])
    summary = enrich.run(config(m["jsonl"], remote, *cap, _judges("openai", served, logits="fallback_to_generate")))
    a, b = _by_id(hf), _by_id(remote)
    assert sorted(a) == sorted(b) and len(b) == 12 and summary["records"] == 12
    for rid, row in a.items():
        other = b[rid]
        assert other["status"] == row["status"]
        for x, y in zip(row["image_results"], other["image_results"]):
            assert y["caption"] == x["caption"], rid  # the same greedy caption through the server
            got = {v["judge"]: (v["vote"], v["error"]) for v in y["votes"]}
            assert got == {v["judge"]: (v["vote"], v["error"]) for v in x["votes"]}, rid  # both judges, same votes
            assert y["kept"] == x["kept"] and y["error"] == x["error"], rid
    assert any(r["image_results"][0]["caption"] for r in b.values())  # captions came back
    row = next(iter(b.values()))
    engine = json.loads(row["captioner_engine"])
    assert engine["engine"] == "openai" and engine["served_model"] == served["paths"]["captioner"]
    judges = {j["name"]: j for j in json.loads(row["judges"])}
    assert judges["judge_logits"]["mode"] == "generate"  # the server gave no logprobs: fell back, as configured
    assert judges["judge_generate"]["engine"] == "openai" and judges["judge_generate"]["hosts"]
    with pytest.raises(ConfigError, match="returns no logprobs"):  # refused at start, before any actor
        enrich.run(config(m["jsonl"], tmp_path / "refused", *cap, _judges("openai", served, logits="required")))


def test_server_faults_are_row_errors_and_a_dead_server_stops_the_job(ray_session, tmp_path):
    server = FakeOpenAI()
    try:
        m = write_catalog(tmp_path / "cat", 40, seed=32, tasks=["CC", "SA"])
        remote = f"{{base_url: {server.url}, model: {server.model}, retries: 1, backoff: 0.01}}"
        judges = (
            f"judges=[{{name: judge_logits, model: x, mode: logits, engine: openai, openai: {remote}, pool: {POOL}}}]"
        )
        cap = ["captioner.engine=openai", f"captioner.openai={remote}", f"captioner.pool={POOL}"]
        server.busy_first, server.retry_after = 3, "0.2"
        server.fail = lambda text: 500 if "mug" in text.lower() else None
        server.malformed = lambda text: "scarf" in text.lower()
        out = tmp_path / "out"
        summary = enrich.run(config(m["jsonl"], out, *cap, judges, "records_per_batch=16"))
        rows = _by_id(out)
        assert len(rows) == 40 and summary["records"] == 40
        errors = [res["error"] for r in rows.values() for res in r["image_results"] if res["error"]]
        assert errors and all(e["stage"] in ("caption", "judge") for e in errors)
        messages = " ".join(e["message"] for e in errors)
        assert "HTTP 500" in messages and server.url in messages
        assert server.busy == 3 and server.captions >= 40 + 3  # every image reached it (the 429s were waited out)
        # a server that dies mid-run: every item fails, batch after batch; the job stops naming its URL
        server.fail = server.malformed = None
        server.die_after = server.chats + 20
        with pytest.raises(CaslieError, match=r"failed on every item .*127\.0\.0\.1"):
            enrich.run(
                config(
                    m["jsonl"],
                    tmp_path / "dies",
                    *cap,
                    judges,
                    "records_per_batch=4",
                    "captioner.pool.batch_size=4",
                    "dedup.enabled=false",
                )
            )
    finally:
        server.close()
