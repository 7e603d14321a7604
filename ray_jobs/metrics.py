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
            caslie_serve_images_total{outcome} (a judge that failed on an image: judge_failed),
            caslie_serve_requests_in_flight (per ingress replica: the peak of each report interval),
            caslie_serve_batch_size{model} (requests per model call: captioner, judge_<name>, panel, predictor)

A short job needs care (`ray_jobs.counters`: series that start at zero, first increments held until scraped).
Metric objects are made once per process, on first use. Recording never fails a job: a metrics error is dropped
(logged once).
"""

from __future__ import annotations

import functools
import logging

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
    "caslie_serve_images_total": (
        "Counter",
        "client images captioned and judged, by outcome (kept, not_kept, fetch/decode/caption/judge_failed)",
        ("outcome",),
    ),
    "caslie_serve_requests_in_flight": (
        "Gauge",
        "most requests handled at once by this ingress replica within the last report interval",
        (),
    ),
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
