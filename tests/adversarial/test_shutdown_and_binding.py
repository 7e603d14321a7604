"""`caslie serve` stops in order on SIGTERM (what Kubernetes sends), and a config that would expose the
service beyond loopback without an API key is refused at load time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from helpers import ROOT, free_port

from caslie_core.config import ServeConfig, load_config
from caslie_core.errors import ConfigError


@pytest.mark.slow
def test_sigterm_drains_and_stops_the_service_with_json_logs(ray_session):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_jobs.serve",
            "--config",
            str(ROOT / "configs" / "serve-demo.yaml"),
            "--set",
            f"http.port={port}",
            "--set",
            "model.path=null",
            "--set",
            "model.model=tiny:lm",
            "--set",
            "model.serve_base=false",
            "--set",
            f"ray.address={ray_session}",
            "--set",
            "ray.num_cpus=null",
            "--set",
            "ray.log_format=json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the service did not come up")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    said = [line["message"] for line in lines if "message" in line]  # ray.log_format=json: JSON log lines
    assert "shutting down" in said and any(m.startswith("CASLIE is serving at") for m in said), out[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_binding_beyond_loopback_needs_a_key_or_an_explicit_opt_in(host):
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, ROOT / "configs" / "serve-demo.yaml", [f"http.host={host}"])
    assert "http.api_key_env" in str(e.value) and "allow_insecure" in str(e.value) and host in str(e.value)
    cfg = load_config(
        ServeConfig, ROOT / "configs" / "serve-demo.yaml", [f"http.host={host}", "http.allow_insecure=true"]
    )
    assert cfg.http.host == host
    cfg = load_config(
        ServeConfig, ROOT / "configs" / "serve-demo.yaml", [f"http.host={host}", "http.api_key_env=SOME_KEY"]
    )
    assert cfg.http.api_key_env == "SOME_KEY"
    for local in ("127.0.0.1", "localhost", "::1"):
        assert load_config(ServeConfig, ROOT / "configs" / "serve-demo.yaml", [f"http.host={local}"])
