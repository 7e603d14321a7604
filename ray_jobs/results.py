"""The result store on Ray (`caslie_core.io.results`, `caslie_core.enrichment.stored`): the lookup actors that
hold a run's stored captions and votes, their client in the fetch tasks, and the run's end.

The stored results of the run's models are loaded by `store.shards` lookup actors (each its share of the keys,
`shard_of`), never by the driver or by the tasks: a fetch task asks the actors for the keys of its batch, one call
per shard. A shard loads when first asked, while the plane starts (a resumed run with nothing left loads nothing).
When the run ends the job says what they held and gave, its per-batch parts are merged (a task next to the data)
and the actors go.
"""

from __future__ import annotations

from caslie_core.enrichment.stored import StoreUse
from caslie_core.io.results import ResultIndex, ResultStore, shard_of

from .actors import best_effort_get, unreachable_errors
from .common import log


class LookupShard:
    """One lookup actor: its share of the stored results of the run's models (`ResultIndex`), loaded when first
    asked (while the plane starts; never, when a resumed run has nothing left to look up)."""

    def __init__(self, path: str, models: dict, shard: int, shards: int) -> None:
        self.args, self.index = (path, {k: set(v) for k, v in models.items()}, shard, shards), None

    def get(self, kind: str, keys: list[str]) -> dict:
        if self.index is None:
            self.index = ResultIndex(*self.args)
        return self.index.get(kind, keys)

    def stats(self) -> dict:
        return self.index.stats() if self.index is not None else {}


class LookupClient:
    """`Lookup` over the run's lookup actors (picklable: names only; handles are found where it is used). A shard
    that cannot be reached answers nothing: its keys are computed again, said once per process."""

    TIMEOUT_S = 900.0  # the first call waits for its shard to load (about 7 s per 1M keys here)

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
    """Driver side: start the lookup actors (when the run reads the store); at the end, the store's figures for
    the summary and the log, this run's parts merged, the actors gone."""

    def __init__(self, use: StoreUse, shards: int, namespace: str = "caslie") -> None:
        from .actors import driver_actor

        self.use, self.actors, self.lookup = use, [], None
        if not use.reads:
            return
        models = {k: sorted(v) for k, v in use.models().items()}
        names = [f"caslie-results-{use.run_id}-{i}" for i in range(shards)]
        self.actors = [
            driver_actor(LookupShard, n, namespace, use.path, models, i, shards) for i, n in enumerate(names)
        ]
        self.lookup = LookupClient(names, namespace)

    def finish(self, now: dict) -> dict:
        """The summary's `store` section (`now`: this run's counts); merges this run's parts; stops the actors."""
        import ray

        out = {"path": self.use.path, "reads": self.use.reads, "writes": self.use.writes}
        out.update(captions_from_store=now.get("stored_captions", 0), votes_from_store=now.get("stored_votes", 0))
        if self.actors:
            figures = [best_effort_get(a.stats.remote(), fallback={}, timeout_s=30) for a in self.actors]
            figures = [f for f in figures if f]  # a shard never asked never loaded
            loaded = {kind: sum(f["keys"][kind] for f in figures) for kind in ("captions", "votes")}
            load_s = max((f["load_s"] for f in figures), default=0.0)
            out.update(loaded=loaded, load_seconds=load_s, lookups=sum(f["asked"] for f in figures))
            held = f"{loaded['captions']:,} captions and {loaded['votes']:,} votes of this run's models"
            log.info(
                f"[enrich] result store {self.use.path}: {out['captions_from_store']:,} captions and "
                f"{out['votes_from_store']:,} votes taken from it; "
                + (f"its lookup actors held {held} (loaded in {load_s:.1f} s)" if figures else "nothing looked up")
            )
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
