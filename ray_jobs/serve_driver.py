"""The driver side of `caslie serve`: start Serve and deploy the app (`start`), serve inside a block (`serving`),
serve until interrupted (`run`). Each takes the app's builder (`ray_jobs.serve.build_app`, which calls these
with it: this module never imports the app's)."""

import contextlib
import signal
import threading

from ray import serve

from caslie_core.config import ServeConfig

from .common import init_ray, requiet
from .common import log as say  # the driver's own lines

APP_NAME = "caslie"


def start(cfg: ServeConfig, build, *, name: str = APP_NAME) -> str:
    """Start Serve on `http.host:http.port` and deploy the app; returns the base URL once it is ready."""
    # ray.log_format=json (or the file's logging_config encoding JSON): Serve's controller, proxies and our
    # replicas write JSON lines too
    logging = {"encoding": "JSON"} if cfg.ray.log_format == "json" else None
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, logging_config=logging)
    requiet()  # Serve sets its driver-side logger on start
    serve.run(build(cfg), name=name, route_prefix="/", logging_config=logging)
    return f"http://{cfg.http.host}:{cfg.http.port}"


@contextlib.contextmanager
def serving(cfg: ServeConfig, build):
    """`with serving(cfg) as url:` the app runs inside the block and is shut down after it."""
    started = init_ray(cfg.ray)
    before = serve.status()
    shared = bool(before.proxies or before.applications)  # Serve already runs here (other apps may too)
    try:
        yield start(cfg, build)
    finally:
        serve.delete(APP_NAME) if shared else serve.shutdown()
        if started:
            import ray

            ray.shutdown()


def run(cfg: ServeConfig, build) -> None:
    """`caslie serve`: serve until interrupted (Ctrl-C or SIGTERM), then shut Serve down in order."""
    stop = threading.Event()
    started = init_ray(cfg.ray)
    # Ray's driver handler turns SIGTERM into SystemExit wherever the main thread is (mid-deploy, inside
    # gRPC calls) and the process then aborts on the way out; ours, set after Ray's, only asks the loop
    # below to end, so Serve drains and stops (also when the signal comes while the app is deploying).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with serving(cfg, build) as url:
            say.info(f"CASLIE is serving at {url}; Ctrl-C stops it\n  curl {url}/healthz   {url}/v1/models")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            say.info("shutting down")
    finally:
        if started:
            import ray

            ray.shutdown()
