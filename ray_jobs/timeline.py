"""A job's scaling timeline on Ray (`caslie_core.enrichment.timeline` holds the logic).

The driver samples `ray.nodes()` every second in a thread; the model actors tell the job's one named helper actor
(`RunHelper`, on the driver's node: one clock; it holds the run's caption claims too) when they finish batches,
fire-and-forget. At the end the driver merges both, logs
the events (`[timeline] +4.1s node ...01 added (CPU 1, GPU 1)`) and puts them in the job's summary.
"""

from __future__ import annotations

import threading
import time

from caslie_core.enrichment import outcomes
from caslie_core.enrichment.timeline import RunHelper, Timeline

from . import counters
from .actors import actor_id, best_effort_get, driver_actor
from .common import log


class JobHelper(RunHelper):
    """The job's helper actor on Ray: besides the claims and the timeline, it records the model actors' batch
    outcomes into `caslie_enrich_stage_images_total` and their batches redone into `caslie_batch_fallbacks_total`
    (one long-lived process: its series start at zero with the job, so the first batches are seen to rise;
    `close()` records what is held before it exits)."""

    def __init__(self, judges: list[str], *claims) -> None:
        super().__init__(*claims)
        self.counts = counters.Counts(counters.stage_series(judges))

    def batch(self, pool, actor, node, rows, t=None, fallbacks=None, batches=1, counts=None) -> None:
        super().batch(pool, actor, node, rows, t, fallbacks, batches)
        for model, (n, _) in (fallbacks or {}).items():
            self.counts.add("caslie_batch_fallbacks_total", n, model=model)
        for key, n in (counts or {}).items():
            stage, _, outcome = key.rpartition("/")
            self.counts.add("caslie_enrich_stage_images_total", n, stage=stage, outcome=outcome)

    def close(self) -> None:
        self.counts.flush()


def alive_nodes() -> dict[str, dict]:
    """{node id: its CPU and GPU} of the cluster's alive nodes."""
    import ray

    return {
        n["NodeID"]: {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    }


class JobTimeline:
    """Driver side: start before the pipeline, `finish()` after it; `actor_ref` (the helper's name and namespace)
    goes to the model actors, for their batch reports and, with `claims` ((ttl, max entries) of the run's caption
    cache), their caption claims."""

    def __init__(
        self, run_id: str, interval_s: float = 1.0, claims: tuple[float, int] | None = None, judges: list[str] = ()
    ) -> None:
        self.timeline, self.interval_s = Timeline(), interval_s
        self.actor_ref = (f"caslie-run-{run_id}", "caslie")
        self.actor = driver_actor(JobHelper, *self.actor_ref, list(judges), *(claims or ()))
        self._stop = threading.Event()
        self._sample()  # the cluster at the start: its nodes are not "added"
        self._thread = threading.Thread(target=self._watch, name="caslie-timeline", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            self.timeline.see_nodes(alive_nodes())
        except Exception as e:  # noqa: BLE001 - a missed sample is a coarser timeline, never a failed job
            log.debug(f"[timeline] node sample failed: {e}")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _halt(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def finish(self, t0: float, *, last_record: float | None) -> dict:
        """The job's timeline (logged too): the nodes as they are now, the actors' batches, then `stop()`."""
        self._halt()
        self._sample()
        self.timeline.merge(self._settled_events())
        self.stop()
        summary = self.timeline.summary(t0, last_record=last_record)
        for line in Timeline.lines(summary):
            log.info(f"[timeline] {line}")
        for model, f in summary["batch_fallbacks"].items():  # never silent: a model that cannot batch looks slow
            slow = (
                "; it runs at batch size 1 (its actor's log has the exception)" if f["running_at_batch_size_1"] else ""
            )
            log.warning(f"[enrich] {model}: {f['batches_redone']} batches raised and were redone item by item{slow}")
        return summary

    def _settled_events(self, settle_s: float = 0.3, most_s: float = 3.0) -> list:
        """The actors' batch records once they stop changing: retired actors send their last rows as they exit."""
        events, end = None, time.monotonic() + most_s
        while True:
            now = best_effort_get(self.actor.events.remote(), fallback=[], timeout_s=10)
            if now == events or time.monotonic() > end:
                return now
            events = now
            time.sleep(settle_s)

    def claim_stats(self) -> dict:
        """The caption cache's figures (entries, hits, claims in flight); {} when its helper is gone."""
        if self.actor is None:
            return {}
        return best_effort_get(self.actor.stats.remote(), fallback=None)

    def stop(self) -> None:
        """Stop sampling and remove the helper actor (again is a no-op): it records what it holds and exits on its
        own (an actor that exits sends its last metric values; one killed would not), killed if it cannot."""
        import ray

        self._halt()
        if self.actor is not None:
            try:
                best_effort_get(self.actor.close.remote(), fallback=False, timeout_s=5)
                gone = self.actor.__ray_terminate__.options(max_task_retries=0).remote()
                best_effort_get(gone, fallback=False, timeout_s=5)  # returns once the actor has exited
            except Exception:  # noqa: BLE001 - already gone with its node or the job
                try:
                    ray.kill(self.actor)
                except Exception:  # noqa: BLE001, S110
                    pass
            self.actor = None


class TimelineClient:
    """In a model actor: reports its batches, never waited on, at most once every `every_s` seconds (the first at
    once: its time is the pool's start), the rows, batches and model fallbacks since the last report; `flush()` sends
    the rest (the actor's last batches, from its UDF's `__del__` when Ray Data retires it). One call per batch cost
    the 2-core plane about 7% at 100k records (three pools, ~2,300 calls)."""

    def __init__(self, ref: tuple[str, str], pool: str, every_s: float = 1.0) -> None:
        import ray

        self.pool, self.me, self.node = pool, actor_id(), ray.get_runtime_context().get_node_id()
        self.every_s, self.sent_at = every_s, None
        self.rows, self.batches, self.fallbacks, self.counts = 0, 0, {}, {}
        try:
            self.actor = ray.get_actor(ref[0], namespace=ref[1])
        except ValueError:  # not there (a job run without one): no timeline
            self.actor = None

    def batch(self, rows: int, fallbacks: dict | None = None, counts: dict | None = None) -> None:
        self.rows, self.batches = self.rows + rows, self.batches + 1
        outcomes.add(self.counts, counts)
        for model, (n, single_only) in (fallbacks or {}).items():
            had = self.fallbacks.get(model, (0, False))
            self.fallbacks[model] = (had[0] + n, had[1] or single_only)
        if self.sent_at is None or time.monotonic() - self.sent_at >= self.every_s:
            self.flush()

    def flush(self, wait_s: float = 0.0) -> None:
        """Send what is pending; `wait_s` > 0 waits for it (an actor about to exit)."""
        if self.actor is None or not self.batches:
            return
        ref = self.actor.batch.remote(
            self.pool, self.me, self.node, self.rows, None, self.fallbacks or None, self.batches, counts=self.counts
        )
        self.rows, self.batches, self.fallbacks, self.counts, self.sent_at = 0, 0, {}, {}, time.monotonic()
        if wait_s:
            best_effort_get(ref, fallback=None, timeout_s=wait_s)
