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
