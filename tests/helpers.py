"""Helpers shared by the tests (import them from here, never from conftest)."""

from __future__ import annotations

import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_config(catalog, work, *overrides):
    from caslie_core.config import TrainConfig, load_config

    return load_config(
        TrainConfig,
        ROOT / "configs" / "train-demo.yaml",
        [
            f"input.path={catalog}",
            f"run.storage_path={work / 'runs'}",
            f"output.path={work / 'model'}",
            "ray.num_cpus=null",
            "ray.object_store_memory=null",
            *overrides,
        ],
    )


def steps_logged(run_dir: Path) -> int:
    """Optimizer steps a training run has logged so far, over all its attempts (`RUN_DIR/progress`)."""
    progress = Path(run_dir) / "progress"
    return sum(len(p.read_text().splitlines()) for p in progress.glob("steps-*.jsonl")) if progress.exists() else 0


def checkpoint_registered(run_dir: Path) -> bool:
    """Ray Train has registered a reported checkpoint of the run (its controller writes this snapshot)."""
    return (Path(run_dir) / "checkpoint_manager_snapshot.json").exists()


def scrape_metrics(names: list[str], timeout: float = 30.0, until=None) -> dict[str, list[str]]:
    """The Prometheus lines of the local Ray node's metrics endpoint for each of `names` (our metrics are
    exported as `ray_<name>`), polled until every name has a sample (and `until(found)` holds, when given: a
    series created at zero is there before the values that matter) or `timeout` passes."""
    import time
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    found: dict[str, list[str]] = {}
    end = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        found = {n: [line for line in lines if line.startswith(f"ray_{n}")] for n in names}
        if (all(found.values()) and (until is None or until(found))) or time.monotonic() > end:
            return found
        time.sleep(1)


def processes_under(folder: str) -> list[int]:
    """Pids of the processes that name `folder` on their command line or hold a file under it open. Ray's workers
    rename themselves (`ray::TrainController`), so only their open log files tell which cluster they belong to;
    one left behind by its raylet is otherwise invisible to `pgrep -f`."""
    import os

    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if folder in fh.read().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry))
                    continue
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(folder) for fd in os.listdir(f"/proc/{entry}/fd")):
                found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_processes_under(folder: str, grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to every process of `processes_under(folder)`."""
    import os
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_under(folder)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            return
        if sig == signal.SIGTERM:
            time.sleep(grace_s)


class Prometheus:
    """A real Prometheus server (the system's `prometheus` binary) scraping one Ray node's metrics port every
    second, and the dashboard's queries run against it as Grafana would run them."""

    SCRAPE_S = 2  # and its timeout: late in a suite, Ray's metrics agent may take over a second to render

    def __init__(self, exe: str, metrics_port: int, folder) -> None:
        import subprocess
        import time

        import requests

        config = folder / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {self.SCRAPE_S}s, scrape_timeout: {self.SCRAPE_S}s, "
            f"evaluation_interval: {self.SCRAPE_S}s}}\n"
            f"scrape_configs:\n  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}", "--log.level=warn"]
            + [f"--web.listen-address={self.url[7:]}"],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.time() + 90
        while True:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"prometheus did not start: {(folder / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        while not any(self.value("up", time.time()).values()):  # its first scrape comes a few seconds after
            if time.time() > deadline:
                self.close()  # no server left behind by a fixture that fails
                raise RuntimeError("prometheus never scraped the Ray node's metrics port")
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def range(self, expr: str, start: float, end: float) -> list[dict]:
        """`query_range` at one-second steps: the series, each with its [[t, "value"], ...]."""
        import requests

        # Grafana's $__rate_interval: max(step + scrape interval, 4 scrape intervals)
        expr = expr.replace("$__rate_interval", f"{4 * self.SCRAPE_S}s")
        r = requests.get(
            f"{self.url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": 1}, timeout=30
        )
        assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text[:500])
        return r.json()["data"]["result"]

    def value(self, expr: str, at: float) -> dict:
        """An instant query: {the series' labels as a sorted tuple: value}."""
        import requests

        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr, "time": at}, timeout=30)
        assert r.status_code == 200, r.text[:500]
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in r.json()["data"]["result"]}

    def wait_scraped(self, seconds: float | None = None) -> None:
        """Long enough for what was recorded to be exported by Ray (report interval) and scraped here."""
        import time

        time.sleep(seconds if seconds is not None else 3 * self.SCRAPE_S + 1)


def dashboard_panels(prefix: str) -> list[dict]:
    """The panels of the shipped Grafana dashboard whose title starts with `prefix` ("Enrichment:", ...)."""
    import json

    dash = json.loads((ROOT / "cluster" / "grafana" / "caslie.json").read_text())
    return [p for p in dash["panels"] if p["title"].startswith(prefix)]


def assert_panels_show_data(prom: Prometheus, prefixes: tuple[str, ...], start: float, end: float) -> dict:
    """Every query of every panel under `prefixes` returns a non-zero value at some step of [start, end + the rate
    window]: what Grafana would draw for that run. Returns {panel title: [each target's largest value]}."""
    import math

    seen, empty = {}, []
    # How often Prometheus could scrape the node: said when a panel is empty (an agent too busy to answer within
    # the scrape timeout, as under a saturated FSDP run, is not a wiring defect), never a failure on its own
    scraped = [float(v) for s in prom.range("up", start, end) for _, v in s["values"]]
    for panel in [p for prefix in prefixes for p in dashboard_panels(prefix)]:
        tops = []
        for target in panel["targets"]:
            values = [
                float(v)
                for s in prom.range(target["expr"], start, end + 4 * prom.SCRAPE_S + 2)
                for _, v in s["values"]
                if not math.isnan(float(v))
            ]
            tops.append(max(values, default=0.0))
            if not any(values):
                empty.append(f"{panel['title']}: {target['expr']}")
        seen[panel["title"]] = tops
    assert not empty, (
        f"panels without data (Prometheus could scrape the Ray node in {sum(scraped):g} of {len(scraped)} steps):\n"
        + "\n".join(empty)
    )
    return seen
