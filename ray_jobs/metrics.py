"""Our metrics, through `ray.util.metrics`: every Ray node exports them with Ray's own on its metrics port
(Prometheus text, names prefixed `ray_`), which `cluster/kuberay/podmonitor.yaml` scrapes and
`cluster/grafana/caslie.json` charts.

enrichment  caslie_enrich_records_total{status}, caslie_enrich_images_total{task},
            caslie_enrich_captions_kept_total{task}, caslie_enrich_image_errors_total{stage},
            caslie_enrich_stage_seconds{stage} (one model batch or one fetch+decode batch)
models      caslie_batch_fallbacks_total{model} (model batches that raised and were redone item by item:
            captioner, judge_<name>, predictor; in the batch job and the service)
training    caslie_train_steps_total, caslie_train_loss, caslie_train_tokens_per_second
serving     caslie_serve_requests_total{route, status}, caslie_serve_stage_seconds{stage},
            caslie_serve_requests_in_flight (per ingress replica),
            caslie_serve_batch_size{model} (requests per model call: captioner, judge_<name>, panel, predictor)

Metric objects are made once per process, on first use. Recording never fails a job: a metrics error is
dropped (logged once).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)
_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_SPECS = {
    "caslie_enrich_records_total": ("Counter", "records written, by status", ("status",)),
    "caslie_enrich_images_total": ("Counter", "images of written records, by task", ("task",)),
    "caslie_enrich_captions_kept_total": ("Counter", "captions the judges kept, by task", ("task",)),
    "caslie_enrich_image_errors_total": ("Counter", "failed images and records, by stage", ("stage",)),
    "caslie_enrich_stage_seconds": ("Histogram", "seconds per batch of a stage", ("stage",)),
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
_OWN_BOUNDARIES = {"caslie_serve_batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256]}  # histograms not of seconds
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
        getattr(_metric(name), how)(value, tags={k: str(v) for k, v in (tags or {}).items()} or None)
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


def enrich_counts(counts: dict) -> None:
    """One written batch's tally (`pipeline.tally`) as the enrichment counters."""
    for status in ("ok", "partial", "failed"):
        inc("caslie_enrich_records_total", counts.get(status, 0), status=status)
    for task, n in (counts.get("images_per_task") or {}).items():
        inc("caslie_enrich_images_total", n, task=task)
    for task, n in (counts.get("captions_kept_per_task") or {}).items():
        inc("caslie_enrich_captions_kept_total", n, task=task)
    for stage, n in (counts.get("errors_per_stage") or {}).items():
        inc("caslie_enrich_image_errors_total", n, stage=stage)
