"""A real two-node Ray cluster on 127.0.0.1 with token authentication on; jobs go in through the Jobs API.

The cluster is started by the test (`ray.cluster_utils.Cluster`: a head with the dashboard and a second raylet)
with RAY_AUTH_MODE=token; clients run as subprocesses because a process reads its auth mode once.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured_cluster(tiny_models, tmp_path_factory):
    token = secrets.token_hex(16)
    # the project's venv first on PATH: job entrypoints say `python`, as on a cluster image
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    host = subprocess.Popen([sys.executable, str(ROOT / "tests" / "clusterhost.py"), str(free_port())], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    # logical CPUs: 2 per node (one 1-CPU task must fit next to the fractional actors on a node)
    info = json.loads(host.stdout.readline())
    url = info["dashboard"]
    deadline = time.time() + 90
    while time.time() < deadline:  # the Jobs API answers (401 without a token) once the dashboard is up
        try:
            if requests.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    env_file = tmp_path_factory.mktemp("renv") / "runtime_env.yaml"
    env_file.write_text("working_dir: .\nexcludes: ['.venv', '.git', 'demo-out', 'bench-out', '**/__pycache__', "
                        "'.pytest_cache', '*.egg-info']\n")
    yield {"url": url, "token": token, "host": host, "runtime_env": str(env_file)}
    host.stdin.write("stop\n")
    host.stdin.flush()
    host.wait(timeout=60)


def _client_env(token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    env["HOME"] = str(Path(env.get("TMPDIR", "/tmp")))  # no ~/.ray/auth_token of the user's
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


def test_jobs_api_refuses_requests_without_the_token(secured_cluster):
    r = requests.get(f"{secured_cluster['url']}/api/jobs/", timeout=10)
    assert r.status_code == 401
    r = requests.post(f"{secured_cluster['url']}/api/jobs/", json={"entrypoint": "echo hi"}, timeout=10)
    assert r.status_code == 401
    r = requests.get(f"{secured_cluster['url']}/api/jobs/", timeout=10,
                     headers={"Authorization": f"Bearer {secured_cluster['token']}"})
    assert r.status_code == 200


def test_submit_enrichment_through_the_jobs_api(secured_cluster, tmp_path):
    from caslie_core.synthetic import write_catalog
    from ray_jobs import enrich

    m = write_catalog(tmp_path / "cat", 24, seed=11, broken_images=2)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ray_jobs.cli", "submit", "enrich", "configs/enrich-demo.yaml",
            "--set", f"input.path={m['jsonl']}", "--set", f"output.path={out}", "--set", "records_per_batch=8",
            "--address", secured_cluster["url"], "--runtime-env", secured_cluster["runtime_env"], "--wait"]

    refused = subprocess.run(args, cwd=ROOT, env=_client_env(None), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert secured_cluster["token"] not in refused.stdout + refused.stderr

    done = subprocess.run(args, cwd=ROOT, env=_client_env(secured_cluster["token"]), capture_output=True,
                          text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout, text[-3000:]
    assert secured_cluster["token"] not in text
    ids = [r["id"] for r in enrich.read_output(str(out), ["id"])]
    assert len(ids) == 24 and len(set(ids)) == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 24 and summary["partial"] == 2 and summary["ok"] + summary["partial"] == 24
