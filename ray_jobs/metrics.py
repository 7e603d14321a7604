"""Our metrics, through `ray.util.metrics`: every Ray node exports them with Ray's own on its metrics port
(Prometheus text, names prefixed `ray_`), which `cluster/kuberay/podmonitor.yaml` scrapes and
`cluster/grafana/caslie.json` charts.

enrichment  caslie_enrich_records_total{status}, caslie_enrich_images_total{task},
            caslie_enrich_captions_kept_total{task}, caslie_enrich_image_errors_total{stage} (what is written: the
            driver counts each written part, so the last values equal the job's summary);
            caslie_enrich_stage_images_total{stage, outcome} (work as it happens: images through fetch/decode, the
            captioner and each judge, and records failing validation, counted per model batch by the job's helper
            actor); caslie_enrich_stage_batches_total{stage, le} (model batches and fetch+decode batches by their
            seconds: a histogram's cumulative buckets kept as counters, so that they too start at zero)
models      caslie_batch_fallbacks_total{model} (model batches that raised and were redone item by item:
            captioner, judge_<name>, predictor; in the batch job and the service)
training    caslie_train_steps_total, caslie_train_loss, caslie_train_tokens_per_second
serving     caslie_serve_requests_total{route, status}, caslie_serve_stage_seconds{stage},
            caslie_serve_requests_in_flight (per ingress replica),
            caslie_serve_batch_size{model} (requests per model call: captioner, judge_<name>, panel, predictor)

A short job needs care: Ray exports a series per process (`WorkerId`) once it has a value, and `rate()` skips a
series' first sample. `Counts` (each process that counts has one) creates its series at zero and holds the first
increments until the zero has been exported and scraped (`hold_s`). Metric objects are made once per process, on
first use. Recording never fails a job: a metrics error is dropped (logged once).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

log = logging.getLogger(__name__)
_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
# Requests per model call: a narrow bucket just below each small size, so that histogram_quantile's interpolation
# inside a bucket reads a batch of 1 as 1 (with buckets starting at le=1 a p50 of ones read 0.5), then powers of 2.
_SIZES = [b for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) for b in (n - 0.001, n)]
_SPECS = {
    "caslie_enrich_records_total": ("Counter", "records written, by status", ("status",)),
    "caslie_enrich_images_total": ("Counter", "images of written records, by task", ("task",)),
    "caslie_enrich_captions_kept_total": ("Counter", "captions the judges kept, by task", ("task",)),
    "caslie_enrich_image_errors_total": ("Counter", "failed images and records written, by stage", ("stage",)),
    "caslie_enrich_stage_images_total": (
        "Counter",
        "images through each stage as the work happens (records, for validate), by stage and outcome",
        ("stage", "outcome"),
    ),
    "caslie_enrich_stage_batches_total": (
        "Counter",
        "batches of a stage, by the seconds they took: cumulative buckets (le), le=+Inf counts them all",
        ("stage", "le"),
    ),
    "caslie_batch_fallbacks_total": (
        "Counter",
        "model batches that raised and were redone item by item, by model",
        ("model",),
    ),
    "caslie_train_steps_total": ("Counter", "optimizer steps", ()),
    "caslie_train_loss": ("Gauge", "training loss of the last step", ()),
    "caslie_train_tokens_per_second": ("Gauge", "training tokens per second (this worker)", ()),
    "caslie_serve_requests_total": ("Counter", "requests answered, by route and HTTP status", ("route", "status")),
    "caslie_serve_stage_seconds": ("Histogram", "seconds per request stage", ("stage",)),
    "caslie_serve_requests_in_flight": ("Gauge", "requests being handled by this ingress replica", ()),
    "caslie_serve_batch_size": ("Histogram", "requests per model call of a replica, by model", ("model",)),
}
_OWN_BOUNDARIES = {"caslie_serve_batch_size": _SIZES}  # histograms not of seconds
_warned: set = set()


@functools.cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, tags = _SPECS[name]
    if kind == "Histogram":
        bounds = _OWN_BOUNDARIES.get(name, _BOUNDARIES)
        return metrics.Histogram(name, description=description, boundaries=bounds, tag_keys=tags)
    return getattr(metrics, kind)(name, description=description, tag_keys=tags)


def _record(name: str, how: str, value: float, tags: dict | None) -> None:
    try:
        metric = _metric(name)
        tags = {k: str(v) for k, v in (tags or {}).items()} or None
        if how == "zero":  # Counter.inc refuses 0; recording 0 creates the series at zero
            metric._record(0.0, tags=tags)
        else:
            getattr(metric, how)(value, tags=tags)
    except Exception as e:  # noqa: BLE001 - metrics never fail the work they describe
        if name not in _warned:
            _warned.add(name)
            log.warning(f"metric {name} not recorded: {type(e).__name__}: {e}")


def inc(name: str, value: float = 1.0, **tags) -> None:
    if value:
        _record(name, "inc", value, tags)


def observe(name: str, seconds: float, **tags) -> None:
    _record(name, "observe", seconds, tags)


def set_gauge(name: str, value: float, **tags) -> None:
    _record(name, "set", value, tags)


def hold_s() -> float:
    """How long a new series must stay at zero to be scraped as zero: Ray's metrics report interval (each process
    sends its values to its node's agent that often) plus Prometheus' scrape interval."""
    try:
        import ray

        report = ray._config.metrics_report_interval_ms() / 1000
    except Exception:  # noqa: BLE001 - Ray's default
        report = 10.0
    try:
        scrape = float(os.environ.get("CASLIE_SCRAPE_INTERVAL_S", "15"))
    except ValueError:
        scrape = 15.0
    return report + scrape


class Counts:
    """This process's counters for a job: `series` are created at zero now; increments (`add`) are held until the
    zero has been exported and scraped (`hold_s`), then recorded as they come; a timer records what is held when
    the hold ends, and `flush()` (the job's end) at once. A label set first seen later starts at zero too, and its
    first increment waits one hold. Thread-safe (the service's event loop and its threads)."""

    def __init__(self, series: dict[str, list[dict]] | None = None, hold: float | None = None) -> None:
        self.hold = hold_s() if hold is None else hold
        self._lock = threading.Lock()
        self._ready: dict[tuple, float] = {}  # series -> when its zero has surely been scraped
        self._held: dict[tuple, float] = {}
        self._timer: threading.Timer | None = None
        for name, label_sets in (series or {}).items():
            for tags in label_sets:
                self.start(name, tags)

    def start(self, name: str, tags: dict) -> None:
        """Create a series at zero now, if it is new to this process (its increments wait for the hold)."""
        with self._lock:
            self._start(name, tags, time.monotonic())

    def _start(self, name: str, tags: dict, now: float) -> tuple:
        key = (name, tuple(sorted((k, str(v)) for k, v in tags.items())))
        if key not in self._ready:
            _record(name, "zero", 0.0, tags)
            self._ready[key] = now + self.hold
        return key

    def add(self, name: str, value: float = 1.0, **tags) -> None:
        if not value:
            return
        with self._lock:
            now = time.monotonic()
            key = self._start(name, tags, now)
            if self._ready[key] <= now and key not in self._held:
                _record(name, "inc", value, tags)
                return
            self._held[key] = self._held.get(key, 0.0) + value
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self._ready[key] - now) + 0.05, self._release)
                self._timer.daemon = True
                self._timer.start()

    def _release(self, everything: bool = False) -> None:
        with self._lock:
            self._timer, now = None, time.monotonic()
            for key in [k for k in self._held if everything or self._ready[k] <= now]:
                _record(key[0], "inc", self._held.pop(key), dict(key[1]))
            later = [self._ready[k] for k in self._held]
            if later:
                self._timer = threading.Timer(max(0.0, min(later) - now) + 0.05, self._release)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Record everything held now (the job ends: a count is never lost, even if its zero was not scraped)."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
        self._release(everything=True)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


@functools.cache
def here() -> Counts:
    """This process's own `Counts` (a fetch/decode task's worker, a model actor), made on first use."""
    return Counts()


def batch_seconds(stage: str, seconds: float, into: Counts | None = None) -> None:
    """One batch of `stage` into `caslie_enrich_stage_batches_total`: +1 in every bucket whose bound it is under.
    The buckets of the stage start at zero together (the first time this process sees the stage)."""
    into = into or here()
    bounds = [*_BOUNDARIES, float("inf")]
    for bound in bounds:
        into.start("caslie_enrich_stage_batches_total", {"stage": stage, "le": _le(bound)})
    for bound in bounds:
        if seconds <= bound:
            into.add("caslie_enrich_stage_batches_total", 1, stage=stage, le=_le(bound))


def written_series() -> dict[str, list[dict]]:
    """The driver's enrichment series (what is written), at zero when a job starts: every status, stage, task."""
    from caslie_core.items import ERROR_STAGES, STATUSES
    from caslie_core.tasks import TASKS

    tasks = [t.abbr for t in TASKS.values()] + ["_invalid"]
    return {
        "caslie_enrich_records_total": [{"status": s} for s in STATUSES],
        "caslie_enrich_images_total": [{"task": t} for t in tasks],
        "caslie_enrich_captions_kept_total": [{"task": t} for t in tasks],
        "caslie_enrich_image_errors_total": [{"stage": s} for s in ERROR_STAGES],
    }


def stage_series(judges: list[str]) -> dict[str, list[dict]]:
    """The helper's series (work as it happens), at zero when a job starts (`outcomes.count`'s keys)."""
    pairs = [("validate", "failed"), ("caption", "cached")]
    pairs += [(s, o) for s in ("fetch_decode", "caption", *judges) for o in ("ok", "failed")]
    return {
        "caslie_enrich_stage_images_total": [{"stage": s, "outcome": o} for s, o in pairs],
        "caslie_batch_fallbacks_total": [{"model": m} for m in ("captioner", *(f"judge_{j}" for j in judges))],
    }


SERVE_ROUTES = ("/v1/enrich", "/v1/predict", "/v1/chat/completions", "/v1/completions")
SERVE_STATUSES = (200, 400, 401, 404, 408, 413, 422, 429, 500, 503, 504)


def serve_series() -> dict[str, list[dict]]:
    """An ingress replica's request series, at zero when it starts: each counted route and each status it answers."""
    return {"caslie_serve_requests_total": [{"route": r, "status": s} for r in SERVE_ROUTES for s in SERVE_STATUSES]}


def enrich_counts(counts: dict, into: Counts) -> None:
    """One written batch's tally (`pipeline.tally`) as the enrichment counters (the driver's `Counts`)."""
    for status in ("ok", "partial", "failed"):
        into.add("caslie_enrich_records_total", counts.get(status, 0), status=status)
    for task, n in (counts.get("images_per_task") or {}).items():
        into.add("caslie_enrich_images_total", n, task=task)
    for task, n in (counts.get("captions_kept_per_task") or {}).items():
        into.add("caslie_enrich_captions_kept_total", n, task=task)
    for stage, n in (counts.get("errors_per_stage") or {}).items():
        into.add("caslie_enrich_image_errors_total", n, stage=stage)
