"""Counting so that a short job shows: series that start at zero, held first increments, peaks that last.

Ray exports a series per process (a `WorkerId` label) only once it has a value, and Prometheus' `rate()` skips a
series' first sample, so a count that appears with its first value is never seen to rise. `Counts` (each process
that counts has one) creates its series at zero and holds its first increments until the zero has been exported
and scraped (`hold_s`). A gauge is exported once per report interval: `InFlight` keeps a burst's peak up that long.
"""

from __future__ import annotations

import functools
import os
import threading
import time

from .metrics import _BOUNDARIES, _record, set_gauge


def report_s() -> float:
    """Ray's metrics report interval: each process sends its values to its node's agent that often."""
    try:
        import ray

        return ray._config.metrics_report_interval_ms() / 1000
    except Exception:  # noqa: BLE001 - Ray's default
        return 10.0


def hold_s() -> float:
    """How long a new series must stay at zero to be scraped as zero: Ray's report interval plus Prometheus'
    scrape interval (`CASLIE_SCRAPE_INTERVAL_S`, 15 s as the PodMonitor's)."""
    report = report_s()
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


class InFlight:
    """Requests in flight as a gauge of their peak: Ray exports a gauge's value once per report interval, so a
    burst between two reports would never show. The gauge shows the most in flight during the current and the
    previous tick's interval (a tick per report plus scrape interval, `hold_s`): a peak stays up that long, so a
    report carries it and a scrape sees it."""

    def __init__(self, name: str = "caslie_serve_requests_in_flight") -> None:
        self.name, self.now, self.peak = name, 0, 0
        self.carry = 0  # the previous interval's peak, shown through this one
        set_gauge(name, 0)
        self._tick = threading.Thread(target=self._ticks, args=(max(hold_s(), 0.5),), daemon=True)
        self._tick.start()

    def up(self) -> None:
        self.now += 1
        if self.now > self.peak:
            self.peak = self.now
            set_gauge(self.name, max(self.carry, self.peak))

    def down(self) -> None:
        self.now -= 1

    def _ticks(self, every: float) -> None:
        while True:  # an interval's peak is shown through the next interval too: a whole report interval
            time.sleep(every)
            self.carry, self.peak = self.peak, self.now
            set_gauge(self.name, max(self.carry, self.peak))


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
    pairs += [(s, "stored") for s in ("caption", *judges)]  # the result store's (`store.path`)
    return {
        "caslie_enrich_stage_images_total": [{"stage": s, "outcome": o} for s, o in pairs],
        "caslie_batch_fallbacks_total": [{"model": m} for m in ("captioner", *(f"judge_{j}" for j in judges))],
    }


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
