"""Autoscaling enrichment on Ray's own autoscaler: a local cluster that grows GPU nodes under load and drops them.

The test starts the cluster itself: `ray start --head --autoscaling-config=...` with Ray's fake multi-node
provider (node processes on this machine that the autoscaler adds and removes as a cloud provider would), its
own temp dir and ports, token auth on. Node shapes are the shipped launcher's (`cluster/launcher/aws-gpu.yaml`)
scaled down: a head that runs the CPU stages (2 CPUs, no GPU) and a `gpu` worker type of 1 GPU and 1 CPU, 0 to
2 of them, 15 s idle timeout. It is stopped by killing the processes that name its temp dir, never `ray stop`
(which would kill every Ray process on the machine, the suite's own session included).

`caslie enrich` runs against it as a user would (`--set ray.address=...`, only the token in its environment, input
and output paths relative to its own folder, which is not the cluster's) with a
captioner pool asking `num_gpus: 1`, `min_size: 1`, `max_size: 2`. The tiny captioner is given 128 tokens per
caption so that it is the pipeline's bottleneck, as a real VLM is: Ray Data then asks for a second GPU node and
grows the pool to it. Meanwhile the test watches the cluster's nodes through the dashboard's state API.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from helpers import ROOT, free_port, kill_processes_under

pytestmark = pytest.mark.slow

IDLE_S = 15
RECORDS = 1500


def _cluster_config(gcs_address: str) -> dict:
    shipped = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    gpu = shipped["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0  # what is scaled down below
    return {
        "cluster_name": "caslie-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider assumes port 6379 otherwise
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        **{k: shipped[k] for k in ("auth",) if k in shipped},
        "docker": {},
        **{
            k: []
            for k in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


class NodeWatch:
    """Polls the cluster's alive GPU nodes (the dashboard's state API) and keeps each change with its time."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {token}"}
        self.changes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def gpu_nodes(self) -> int | None:
        try:
            r = requests.get(f"{self.url}/api/v0/nodes?limit=100", headers=self.headers, timeout=5)
            nodes = r.json()["data"]["result"]["result"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return sum(1 for n in nodes if n["state"] == "ALIVE" and n.get("resources_total", {}).get("GPU"))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            n = self.gpu_nodes()
            if n is not None and (not self.changes or self.changes[-1][1] != n):
                self.changes.append((time.time(), n))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray._private.services as services

    folder = tempfile.mkdtemp(prefix="caslie_ray_asc_", dir="/tmp")  # CI's leftover sweep matches the prefix
    token = secrets.token_hex(16)
    port, dashboard = free_port(), free_port()
    address = f"{services.get_node_ip_address()}:{port}"
    (Path(folder) / "autoscaling.json").write_text(json.dumps(_cluster_config(address)))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=path, AUTOSCALER_UPDATE_INTERVAL_S="1")
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={folder}/ray",
        f"--autoscaling-config={folder}/autoscaling.json",
        "--num-cpus=2",
        "--object-store-memory=300000000",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, env={**env, "RAY_FAKE_CLUSTER": "1"}, check=True, capture_output=True, timeout=120)
        watch = NodeWatch(f"http://127.0.0.1:{dashboard}", token)
        deadline = time.time() + 60
        while watch.gpu_nodes() is None and time.time() < deadline:
            time.sleep(0.5)
        yield {"address": address, "token": token, "env": env, "folder": folder, "watch": watch}
    finally:
        kill_processes_under(folder)


def test_enrichment_grows_a_gpu_pool_on_new_nodes_and_the_nodes_go_after(autoscaling_cluster, tmp_path):
    from caslie_core.io import store
    from caslie_core.synthetic import write_catalog

    c = autoscaling_cluster
    write_catalog(tmp_path / "catalog", RECORDS, seed=5)
    out = tmp_path / "enriched"
    assert c["watch"].gpu_nodes() == 0
    overrides = {
        "ray.address": c["address"],
        # relative to this driver's folder, not the cluster's (started from the repository)
        "input.path": "catalog/records.jsonl",
        "output.path": "enriched",
        "captioner.pool.num_gpus": 1,
        "captioner.pool.min_size": 1,
        "captioner.pool.max_size": 2,
        "captioner.pool.batch_size": 32,
        "captioner.max_new_tokens": 128,  # the captioner is the bottleneck, as a VLM is
        "captioner.micro_batch": 8,
        "records_per_batch": 32,
        "dedup.enabled": False,  # every image captioned: the synthetic catalog repeats its pictures
        "output.report_per_task": 0,
    }
    argv = [sys.executable, "-m", "ray_jobs.cli", "enrich", str(ROOT / "configs" / "enrich-demo.yaml")]
    for k, v in overrides.items():
        argv += ["--set", f"{k}={v}"]
    with c["watch"] as watch:
        t0 = time.time()
        env = {k: v for k, v in c["env"].items() if k != "RAY_AUTH_MODE"}  # a user with only the token at hand
        job = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        ended = time.time()
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        deadline = ended + IDLE_S + 45
        while (watch.changes[-1][1] if watch.changes else None) != 0 and time.time() < deadline:
            time.sleep(0.5)
    summary = json.loads((out / "summary.json").read_text())
    timeline = summary["timeline"]
    print("\n".join(line for line in (job.stdout + job.stderr).splitlines() if "[timeline]" in line))
    print(
        f"+{ended - t0:.1f}s job ended (the test's clock); GPU nodes seen: {[(round(t - t0, 1), n) for t, n in watch.changes]}"
    )

    said = job.stdout + job.stderr
    assert "local paths made absolute" in said and "connecting with RAY_AUTH_MODE=token" in said
    # every record written once
    ids = [r["id"] for r in store.read_output(str(out), ["id"])]
    assert len(ids) == len(set(ids)) == RECORDS
    assert summary["records"] == RECORDS and summary["failed"] == 0
    # the autoscaler added GPU nodes for the pool, and the pool grew to two actors on two GPU nodes while there was work
    added = [n for n in timeline["nodes"] if n["added_s"] is not None and n["resources"].get("GPU")]
    assert len(added) == 2, timeline
    pool = timeline["pools"]["captioner.pool"]
    assert pool["peak_actors"] == 2, timeline
    assert {a["node"] for a in pool["actors"]} <= {n["node"] for n in added}
    assert len({a["node"] for a in pool["actors"]}) == 2
    assert timeline["first_batch_s"] <= pool["peak_at_s"] < timeline["last_record_s"]
    assert summary["capacity_wait_s"]["captioner.pool"] > 0  # the first GPU node came for the job's probe
    # ... and both GPU nodes left within the idle timeout (plus the autoscaler's own round trips) after the job
    assert max(n for _, n in watch.changes) == 2
    assert watch.changes[-1][1] == 0, watch.changes
    gone = watch.changes[-1][0] - ended
    print(f"GPU nodes all removed {gone:.1f}s after the job ended (idle timeout {IDLE_S}s)")
    assert gone <= IDLE_S + 15
