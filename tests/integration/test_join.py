"""A job joins a cluster started the way a user starts one: `ray start --head`, with nothing set by hand.

Ray 2.60's `ray start` turns token authentication on whenever a token exists (any earlier local `ray.init()`
writes ~/.ray/auth_token), and a driver given the cluster's address never turns it on by itself: the job must
find the mode. The cluster runs under its own HOME (its token there) and temp folder; its processes are killed
by that folder (RAY_TMPDIR: where Ray's address file and sessions go) at the end, never by `ray stop` (which would stop the suite's own session too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import ROOT, free_port, kill_processes_under

from caslie_core.synthetic import write_catalog

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
DEMO = str(ROOT / "configs" / "enrich-demo.yaml")


TMP = f"/tmp/caslie_ray_join_{uuid.uuid4().hex[:6]}"  # this machine's temp folder, as Ray sees it (RAY_TMPDIR)


def _env(home: Path) -> dict:
    drop = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT), "RAY_TMPDIR": TMP}


@pytest.fixture(scope="module")
def started_cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = _env(home)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    os.makedirs(TMP, exist_ok=True)
    port = free_port()
    args = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    args += ["--disable-usage-stats"]
    started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert "Token authentication is enabled" in started.stdout + started.stderr  # as a user sees it
        yield {"home": home, "port": port}
    finally:
        kill_processes_under(TMP)


def test_a_job_joins_a_token_auth_ray_start_cluster_with_nothing_set_by_hand(started_cluster, tiny_models, tmp_path):
    m = write_catalog(tmp_path / "cat", 6, seed=40, tasks=["CC"])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ray_jobs.cli", "enrich", DEMO]
    args += ["--set", f"input.path={m['jsonl']}", "--set", f"output.path={out}"]
    t = time.monotonic()
    run = subprocess.run(args, cwd=ROOT, env=_env(started_cluster["home"]), capture_output=True, text=True, timeout=300)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-3000:]
    assert "joined the running local Ray cluster" in said
    assert f":{started_cluster['port']}" in said, said[-2000:]
    assert "uses token authentication: connecting with the token from" in said
    assert json.loads((out / "summary.json").read_text())["records"] == 6
    assert time.monotonic() - t < 240


def test_without_the_token_the_job_fails_at_once_with_the_fix(started_cluster, tmp_path):
    m = write_catalog(tmp_path / "cat", 2, seed=41, tasks=["CC"])
    args = [sys.executable, "-m", "ray_jobs.cli", "enrich", DEMO]
    args += ["--set", f"input.path={m['jsonl']}", "--set", f"output.path={tmp_path / 'out'}"]
    stranger = tmp_path / "stranger"  # another user's HOME: no ~/.ray/auth_token
    stranger.mkdir()
    t = time.monotonic()
    run = subprocess.run(args, cwd=ROOT, env=_env(stranger), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t
    said = run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in said, said[-3000:]  # a user error: exit status 2
    assert "uses token authentication" in last and "RAY_AUTH_TOKEN" in last and "ray get-auth-token" in last
    assert took < 15, took  # not Ray's ~20 s of connection retries
