"""The result store on Ray (`caslie_core.io.results`, `caslie_core.enrichment.stored`): the lookup actors that
hold a run's stored captions and votes, their client in the fetch tasks, and the run's end.

The stored results of the run's models are loaded by `store.shards` lookup actors (each its share of the keys,
`shard_of`), never by the driver or by the tasks: a fetch task asks the actors for the keys of its batch, one call
per shard. The driver waits for them to load before the plane starts, and says what they hold. When the run ends
its per-batch parts are merged (a task next to the data) and the actors go.
"""

from __future__ import annotations

import time

from caslie_core.enrichment.stored import StoreUse
from caslie_core.io.results import ResultIndex, ResultStore, shard_of

from .actors import best_effort_get, unreachable_errors
from .common import log


class LookupShard:
    """One lookup actor: its share of the stored results of the run's models (`ResultIndex`)."""

    def __init__(self, path: str, models: dict, shard: int, shards: int) -> None:
        self.index = ResultIndex(path, {k: set(v) for k, v in models.items()}, shard, shards)

    def get(self, kind: str, keys: list[str]) -> dict:
        return self.index.get(kind, keys)

    def stats(self) -> dict:
        return self.index.stats()


class LookupClient:
    """`Lookup` over the run's lookup actors (picklable: names only; handles are found where it is used). A shard
    that cannot be reached answers nothing: its keys are computed again, said once per process."""

    TIMEOUT_S = 120.0

    def __init__(self, names: list[str], namespace: str) -> None:
        self.names, self.namespace, self._handles, self._said = names, namespace, None, False

    def __getstate__(self):
        return {"names": self.names, "namespace": self.namespace}

    def __setstate__(self, state) -> None:
        self.__init__(state["names"], state["namespace"])

    def get(self, kind: str, keys: list[str]) -> dict:
        import ray

        if self._handles is None:
            self._handles = [ray.get_actor(n, namespace=self.namespace) for n in self.names]
        n = len(self._handles)
        by_shard: dict[int, list[str]] = {}
        for k in keys:
            by_shard.setdefault(shard_of(k, n) if n > 1 else 0, []).append(k)
        calls = {i: self._handles[i].get.remote(kind, ks) for i, ks in by_shard.items()}
        found: dict = {}
        for i, ref in calls.items():
            try:
                found.update(ray.get(ref, timeout=self.TIMEOUT_S))
            except unreachable_errors() as e:
                if not self._said:
                    self._said = True
                    log.warning(f"[store] lookup actor {self.names[i]} unavailable ({type(e).__name__}): computing")
        return found


class RunStore:
    """Driver side: start the lookup actors (when the run reads the store) and wait for them; at the end, the
    store's figures for the summary, this run's parts merged, the actors gone."""

    def __init__(self, use: StoreUse, shards: int, namespace: str = "caslie") -> None:
        import ray

        from .actors import driver_actor

        self.use, self.actors, self.lookup, self.loaded = use, [], None, {}
        if not use.reads:
            return
        t = time.monotonic()
        models = {k: sorted(v) for k, v in use.models().items()}
        names = [f"caslie-results-{use.run_id}-{i}" for i in range(shards)]
        self.actors = [
            driver_actor(LookupShard, n, namespace, use.path, models, i, shards) for i, n in enumerate(names)
        ]
        figures = ray.get([a.stats.remote() for a in self.actors])
        self.loaded = {kind: sum(f["keys"][kind] for f in figures) for kind in figures[0]["keys"]}
        self.load_s = round(time.monotonic() - t, 2)
        self.lookup = LookupClient(names, namespace)
        log.info(
            f"[enrich] result store {use.path}: {self.loaded['captions']:,} captions and {self.loaded['votes']:,} "
            f"votes of this run's models loaded by {shards} lookup actor(s) in {self.load_s:.1f} s"
        )

    def finish(self, now: dict) -> dict:
        """The summary's `store` section (`now`: this run's counts); merges this run's parts; stops the actors."""
        import ray

        out = {"path": self.use.path, "reads": self.use.reads, "writes": self.use.writes}
        out.update(captions_from_store=now.get("stored_captions", 0), votes_from_store=now.get("stored_votes", 0))
        if self.actors:
            figures = [best_effort_get(a.stats.remote(), fallback={}, timeout_s=30) for a in self.actors]
            asked = sum(f.get("asked", 0) for f in figures)
            out.update(loaded=self.loaded, load_seconds=self.load_s, lookups=asked)
        if self.use.writes:
            merge = ray.remote(num_cpus=0)(_merge).remote(self.use.path, self.use.run_id)
            out["parts_merged"] = ray.get(merge)
        self.stop()
        return out

    def stop(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self.actors = []


def _merge(path: str, run_id: str) -> dict:
    try:
        return ResultStore(path).merge_run(run_id)
    except Exception as e:  # noqa: BLE001 - a store left in small parts still reads
        log.warning(f"[store] could not merge this run's parts in {path} ({type(e).__name__}: {e})")
        return {}
