"""A real two-node Ray cluster on 127.0.0.1 with token authentication on; jobs go in through the Jobs API.

The cluster is started by the test (`ray.cluster_utils.Cluster`: a head with the dashboard and a second raylet)
with RAY_AUTH_MODE=token; clients run as subprocesses because a process reads its auth mode once. The worker node
is removed (ungracefully, as a lost VM or an evicted pod) while jobs run; both nodes share this machine's disk,
which stands in for the shared storage (s3://, NFS) a real cluster keeps checkpoints and outputs on.
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
from helpers import ROOT, checkpoint_registered, free_port, steps_logged

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured_cluster(tiny_models, tmp_path_factory):
    token = secrets.token_hex(16)
    # the project's venv first on PATH: job entrypoints say `python`, as on a cluster image
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    host = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "clusterhost.py"), str(free_port())],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
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
    env_file.write_text(
        "working_dir: .\nexcludes: ['.venv', '.git', 'demo-out', 'bench-out', '**/__pycache__', "
        "'.pytest_cache', '*.egg-info']\n"
    )
    yield {
        "url": url,
        "token": token,
        "host": host,
        "runtime_env": str(env_file),
        "head": info["head"],
        "workers": info["workers"],
        "gcs": info["gcs"],
    }
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


def _host(cluster: dict, cmd: str) -> dict:
    cluster["host"].stdin.write(cmd + "\n")
    cluster["host"].stdin.flush()
    answer = json.loads(cluster["host"].stdout.readline())
    cluster["workers"] = answer["workers"]
    return answer


def _api(cluster: dict, path: str) -> dict:
    r = requests.get(f"{cluster['url']}{path}", timeout=10, headers={"Authorization": f"Bearer {cluster['token']}"})
    r.raise_for_status()
    return r.json()


def _submit_args(cluster: dict, job: str, config: str, overrides: list[str], *extra: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "submit",
        job,
        config,
        "--address",
        cluster["url"],
        "--runtime-env",
        cluster["runtime_env"],
        *extra,
    ]
    for item in overrides:
        args += ["--set", item]
    return args


def _submit(cluster: dict, job: str, config: str, overrides: list[str]) -> str:
    args = _submit_args(cluster, job, config, overrides)
    done = subprocess.run(
        args, cwd=ROOT, env=_client_env(cluster["token"]), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return _submission_id(done.stdout)


def _submission_id(printed: str) -> str:
    return printed.split(" as ", 1)[1].split()[0]  # caslie submit prints "submitted JOB as ID to ADDRESS"


def _status(cluster: dict, sid: str) -> str:
    return _api(cluster, f"/api/jobs/{sid}")["status"]


def _wait(cluster: dict, sid: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while (status := _status(cluster, sid)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(1)
    return status


def _logs(cluster: dict, sid: str) -> str:
    lines = _api(cluster, f"/api/jobs/{sid}/logs")["logs"].splitlines()
    return "\n".join(line for line in lines if "(raylet)" not in line)[-6000:]  # the job's, not the nodes' lines


def _alive_actors_on(cluster: dict, node: str) -> int:
    q = (
        f"/api/v0/actors?limit=1000&filter_keys=node_id&filter_predicates=%3D&filter_values={node}"
        "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    )
    return len(_api(cluster, q)["data"]["result"]["result"])


def test_jobs_api_refuses_requests_without_the_token(secured_cluster):
    r = requests.get(f"{secured_cluster['url']}/api/jobs/", timeout=10)
    assert r.status_code == 401
    r = requests.post(f"{secured_cluster['url']}/api/jobs/", json={"entrypoint": "echo hi"}, timeout=10)
    assert r.status_code == 401
    r = requests.get(
        f"{secured_cluster['url']}/api/jobs/",
        timeout=10,
        headers={"Authorization": f"Bearer {secured_cluster['token']}"},
    )
    assert r.status_code == 200


def test_submission_without_the_token_fails_with_one_clear_line(secured_cluster, tmp_path):
    args = _submit_args(
        secured_cluster,
        "enrich",
        "configs/enrich-demo.yaml",
        [f"input.path={tmp_path / 'x.jsonl'}", f"output.path={tmp_path / 'out'}"],
        "--wait",
    )
    refused = subprocess.run(args, cwd=ROOT, env=_client_env(None), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "authentication failed" in refused.stderr and "Traceback" not in refused.stderr
    assert secured_cluster["token"] not in refused.stdout + refused.stderr
    assert not _api(secured_cluster, "/api/jobs/")  # nothing was submitted


def test_enrichment_submitted_with_the_token_loses_nothing_when_a_worker_node_dies(secured_cluster, tmp_path):
    """`caslie submit --wait` through the Jobs API; the worker node is killed once the job runs actors on it."""
    from caslie_core.io import store
    from caslie_core.synthetic import write_catalog

    N = 160
    m = write_catalog(tmp_path / "cat", N, seed=12, broken_images=2)
    out = tmp_path / "out"
    args = _submit_args(
        secured_cluster,
        "enrich",
        "configs/enrich-demo.yaml",
        [
            f"input.path={m['jsonl']}",
            f"output.path={out}",
            "records_per_batch=4",
            "captioner.pool.batch_size=4",
            "judges.0.pool.batch_size=4",
            "judges.1.pool.batch_size=4",
            "output.rows_per_part=4",
        ],
        "--wait",
    )
    client = subprocess.Popen(
        args,
        cwd=ROOT,
        env=_client_env(secured_cluster["token"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = secured_cluster["workers"][-1]
    deadline, on_worker = time.time() + 180, 0
    while time.time() < deadline and client.poll() is None:
        # the job's actors run on the worker node and its first records are written
        on_worker = _alive_actors_on(secured_cluster, worker)
        if on_worker and store.list_parts(str(out)):
            break
        time.sleep(0.3)
    assert client.poll() is None and on_worker, "the job never ran actors on the worker node: " + (
        client.stdout.read() if client.poll() is not None else ""
    )
    before = len(store.read_output(str(out), ["id"]))
    assert _host(secured_cluster, "remove-worker")["node"] == worker
    try:
        text, _ = client.communicate(timeout=300)
    finally:
        _host(secured_cluster, "add-worker")  # the autoscaler's part: a replacement node for the next test
    sid = _submission_id(text)
    assert client.returncode == 0 and "SUCCEEDED" in text, _logs(secured_cluster, sid)
    assert f"[enrich] {N} records:" in text  # --wait streamed the job's own log lines (tail_job_logs), with the token
    assert secured_cluster["token"] not in text
    assert before < N, "the node was removed after the job had written everything"
    ids = [r["id"] for r in store.read_output(str(out), ["id"])]
    assert len(ids) == N and len(set(ids)) == N
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == N and summary["partial"] == 2 and summary["ok"] + summary["partial"] == N


def test_training_spreads_over_both_nodes_and_resumes_after_one_is_removed(secured_cluster, train_catalog, tmp_path):
    every, total = 10, 40
    storage, model = tmp_path / "shared" / "runs", tmp_path / "shared" / "model"
    sid = _submit(
        secured_cluster,
        "train",
        "configs/train-demo.yaml",
        [
            f"input.path={train_catalog}",
            f"run.storage_path={storage}",
            f"output.path={model}",
            "run.name=spread",
            "scaling.placement_strategy=SPREAD",
            f"optim.max_steps={total}",
            f"checkpoint.every_steps={every}",
            "eval.enabled=false",
            "optim.batch_size=4",
            "run.max_failures=2",
        ],
    )
    worker = secured_cluster["workers"][-1]
    deadline, lines = time.time() + 240, 0
    while time.time() < deadline:  # a checkpoint is registered with Ray Train, and training has gone past it
        assert _status(secured_cluster, sid) in ("PENDING", "RUNNING"), _logs(secured_cluster, sid)
        lines = steps_logged(storage / "spread")
        if checkpoint_registered(storage / "spread") and lines > every:
            break
        time.sleep(0.1)
    assert every < lines < total, f"the removal would come too early or too late ({lines} steps run)"
    assert _host(secured_cluster, "remove-worker")["node"] == worker
    assert _wait(secured_cluster, sid) == "SUCCEEDED", _logs(secured_cluster, sid)
    s = json.loads((model / "summary.json").read_text())
    first, *later = s["attempts"]
    assert set(first["nodes"]) == {secured_cluster["head"], worker}  # one worker on each node
    assert later and s["restarts"] >= 1 and worker not in later[-1]["nodes"]
    assert later[0]["start_step"] > 0 and later[0]["start_step"] % every == 0  # resumed, not restarted
    assert s["steps"] == total and s["loss_curve"]["steps"] == list(range(1, total + 1))
    assert (model / "adapter" / "adapter_config.json").exists()


def _driver(cluster: dict, cwd, token: str | None, *overrides: str):
    """`python -m ray_jobs.enrich` as a driver joining the cluster at its GCS address, run from `cwd`."""
    env = _client_env(token)
    env.pop("RAY_AUTH_MODE", None)  # as a user who only has the token (or nothing) in the environment
    env["PYTHONPATH"] = str(ROOT)
    args = [sys.executable, "-m", "ray_jobs.enrich", "--config", str(ROOT / "configs" / "enrich-demo.yaml")]
    args += ["--set", f"ray.address={cluster['gcs']}", *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_driver_without_the_token_is_told_what_to_set(secured_cluster, tmp_path, monkeypatch):
    # Ray retries a refused GCS connection about once a second, 20 times by default (the ~20 s a user waits);
    # two tries are enough to see what the job then says
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "2")
    done = _driver(secured_cluster, tmp_path, None, "input.path=x.jsonl", "output.path=out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RAY_AUTH_MODE=token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
