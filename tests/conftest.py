"""Shared fixtures: offline env, tiny models built once, local HTTP and S3 servers, one Ray session."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading

import pytest
from helpers import ROOT, free_port, kill_processes_under, train_config

# Offline, quiet, small: set before anything imports Ray or transformers.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "CASLIE_SCRAPE_INTERVAL_S": "2",  # our Prometheus scrapes every 2 s: new series are held that long
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(key, value)
# ROOT for the project; tests/ so that Ray workers can import the fakes handed to a job (`fakes`).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")] if p
)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


WORLD_TESTS = ("tests/integration/test_demo.py", "tests/integration/test_world.py")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory, request):
    """Each test session builds its tiny models into its own cache (never the user's).

    When the session runs a test that needs the world's trained models (about a minute of training on 2 cores),
    their build starts at once in a background process at idle priority (SCHED_IDLE), so it takes only the CPU
    the tests before it leave unused (they wait on Ray a lot); whoever needs the models first waits on the build's file
    lock (`tiny.build_once`) rather than building them again."""
    import subprocess

    cache = tmp_path_factory.mktemp("caslie-cache")
    os.environ["CASLIE_CACHE"] = str(cache)
    build = None
    if any(item.nodeid.startswith(WORLD_TESTS) for item in request.session.items):
        code = (
            "import os\n"
            "try:\n    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # only what no one else wants\n"
            "except (AttributeError, OSError):\n    os.nice(19)\n"
            "from caslie_core.world.models import ensure_world_models\nensure_world_models()"
        )
        build = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    yield cache
    if build is not None and build.poll() is None:  # the session ended before it was needed
        build.kill()
        build.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_models(_cache):
    from caslie_core.models.tiny import ensure_tiny_models

    return ensure_tiny_models()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """A directory served over HTTP on 127.0.0.1; yields (root_dir, base_url)."""
    root = tmp_path_factory.mktemp("http-root")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3-compatible server on 127.0.0.1; sets AWS_ENDPOINT_URL for boto3 and s3fs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture
def s3_bucket(s3_server):
    import uuid

    import boto3

    name = f"caslie-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(tiny_models, s3_server):
    """One local Ray cluster for the whole suite (auth off: these tests do not test auth).

    Started after the S3 server so that workers inherit AWS_ENDPOINT_URL."""
    import uuid

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = f"/tmp/caslie_ray_{uuid.uuid4().hex[:6]}"
    ray.init(
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
        log_to_driver=False,
        _system_config={"metrics_report_interval_ms": 1000},  # our metrics reach the endpoint within a second
    )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    kill_processes_under(temp_dir)  # a worker its raylet left behind (seen: a ray::TrainController)


@pytest.fixture(scope="session")
def train_catalog(tmp_path_factory, tiny_models):
    """A synthetic MMECInstruct-schema catalog whose answers follow rules readable in the text."""
    from caslie_core.synthetic import write_catalog

    out = tmp_path_factory.mktemp("train-catalog")
    write_catalog(out, 1200, seed=3, splits={"train": 0.72, "val": 0.08, "test": 0.1, "ood_test": 0.1})
    return out / "records.jsonl"


@pytest.fixture(scope="session")
def trained(ray_session, train_catalog, tmp_path_factory, s3_server):
    """One fine-tune through the Ray Train job, shared by the train, evaluation and serving tests. Its run storage
    (checkpoints, Ray Train's run record, the step log) is an S3-compatible bucket, as on a real cluster; the
    adapter is exported to a local folder."""
    import uuid

    import boto3

    from ray_jobs import train

    bucket = f"caslie-runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    work = tmp_path_factory.mktemp("trained")
    cfg = train_config(
        train_catalog,
        work,
        "run.name=learn",
        f"run.storage_path=s3://{bucket}/runs",
        "optim.epochs=6",
        "checkpoint.every_steps=50",
        "eval.every_steps=54",
    )
    summary = train.run(cfg)
    return {"summary": summary, "cfg": cfg, "work": work, "catalog": train_catalog}


@pytest.fixture(scope="session")
def families(_cache):
    """Tiny random stand-ins of the real model families (`tests/families/build.py`), built once per session:
    {name: folder, or "skip: why" where this machine cannot build one}."""
    from families.build import build_families

    return build_families(_cache / "families")


@pytest.fixture
def prometheus(ray_session, tmp_path):
    """A real Prometheus scraping the suite's Ray node every 2 s, where a `prometheus` binary exists (`make
    test` installs Debian's package where apt can); the tests that need it skip, saying why, elsewhere. One per
    test: frequent scrapes make Ray's metrics agent render every series each time (a third of a core on this
    machine at one a second), so it scrapes only while a test looks."""
    import shutil

    import ray
    from helpers import Prometheus

    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("no `prometheus` binary here (make test installs Debian's package where apt can, as root)")
    port = ray._private.worker.global_worker.node.metrics_export_port
    folder = tmp_path / "prometheus"
    folder.mkdir()
    prom = Prometheus(exe, port, folder)
    yield prom
    prom.close()
