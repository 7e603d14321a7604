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


def scrape_metrics(names: list[str], timeout: float = 30.0) -> dict[str, list[str]]:
    """The Prometheus lines of the local Ray node's metrics endpoint for each of `names` (our metrics are
    exported as `ray_<name>`), polled until every name has a sample or `timeout` passes."""
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
        if all(found.values()) or time.monotonic() > end:
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
