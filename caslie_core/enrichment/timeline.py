"""A job's scaling timeline: nodes joining and leaving the cluster, and when each model pool's actors worked.

Fed from two sides: the driver samples the cluster's alive nodes (`see_nodes`), and every model actor says
when it finished a batch (`batch`), stamped with one clock (the process holding the timeline). The summary gives
seconds from the job's start: nodes added or removed during the job, each pool's actors (first and last batch,
node, rows) and the most actors of a pool that were working at once (the pool "at 2" of an autoscaled run).
Ray-free: the Ray side (`ray_jobs.timeline`) only carries the calls.
"""

from __future__ import annotations

import time

from .cache import ClaimTable


def _short(node: str) -> str:
    return node[-6:] if node else "?"


def _fmt_resources(res: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()))


class Timeline:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        # node id -> {"resources", "added", "removed"} ("added" None: there at the start)
        self.nodes: dict[str, dict] = {}
        # (pool, actor id) -> {"node", "first", "last", "batches", "rows"}
        self.actors: dict[tuple[str, str], dict] = {}
        self._sampled = False

    def see_nodes(self, alive: dict[str, dict], t: float | None = None) -> None:
        """The cluster's alive nodes now ({node id: resources}); the first call is the cluster at the start."""
        t = self.clock() if t is None else t
        for node, res in alive.items():
            if node not in self.nodes or self.nodes[node]["removed"] is not None:
                self.nodes[node] = {"resources": dict(res), "added": t if self._sampled else None, "removed": None}
        for node, seen in self.nodes.items():
            if node not in alive and seen["removed"] is None:
                seen["removed"] = t
        self._sampled = True

    def batch(
        self,
        pool: str,
        actor: str,
        node: str,
        rows: int,
        t: float | None = None,
        fallbacks: dict | None = None,
        batches: int = 1,
    ) -> None:
        """An actor of `pool` finished `batches` batches (of `rows` rows in all) since it last said; `fallbacks`:
        {model: (model batches redone item by item since then, whether the model now runs at batch size 1)}
        (`stages.take_fallbacks`)."""
        t = self.clock() if t is None else t
        a = self.actors.setdefault((pool, actor), {"node": node, "first": t, "last": t, "batches": 0, "rows": 0})
        a["last"], a["batches"], a["rows"] = max(a["last"], t), a["batches"] + int(batches), a["rows"] + int(rows)
        for model, (n, single_only) in (fallbacks or {}).items():
            f = a.setdefault("fallbacks", {}).setdefault(model, {"batches_redone": 0, "running_at_batch_size_1": False})
            f["batches_redone"] += int(n)
            f["running_at_batch_size_1"] = f["running_at_batch_size_1"] or bool(single_only)

    def events(self) -> list[tuple]:
        """The batch records, to merge into another timeline (`merge`)."""
        return [(pool, actor, a) for (pool, actor), a in self.actors.items()]

    def merge(self, events: list[tuple]) -> None:
        for pool, actor, a in events:
            self.actors[(pool, actor)] = dict(a)

    @staticmethod
    def peak(intervals: list[tuple[float, float]]) -> tuple[int, float | None]:
        """(most intervals overlapping at one time, the first time that many overlap)."""
        points = sorted([(s, 0) for s, _ in intervals] + [(e, 1) for _, e in intervals])  # starts before ends
        best, at, now = 0, None, 0
        for t, kind in points:
            now += 1 if kind == 0 else -1
            if now > best:
                best, at = now, t
        return best, at

    def summary(self, t0: float, *, last_record: float | None = None) -> dict:
        def rel(t):
            return None if t is None else round(t - t0, 1)

        nodes = [
            {"node": node, "resources": n["resources"], "added_s": rel(n["added"]), "removed_s": rel(n["removed"])}
            for node, n in self.nodes.items()
            if n["added"] is not None or n["removed"] is not None
        ]
        pools: dict[str, dict] = {}
        for (pool, actor), a in sorted(self.actors.items(), key=lambda kv: kv[1]["first"]):
            p = pools.setdefault(pool, {"actors": []})
            p["actors"].append(
                {"actor": actor, "node": a["node"], "first_batch_s": rel(a["first"]), "last_batch_s": rel(a["last"])}
                | {"batches": a["batches"], "rows": a["rows"]}
            )
        for pool, p in pools.items():
            ivs = [(a["first"], a["last"]) for (q, _), a in self.actors.items() if q == pool]
            most, at = self.peak(ivs)
            p["peak_actors"], p["peak_at_s"] = most, rel(at)
        out = {"nodes": sorted(nodes, key=lambda n: (n["added_s"] is None, n["added_s"] or 0)), "pools": pools}
        fallbacks: dict[str, dict] = {}  # per model, over the actors: batches that raised and were redone
        for a in self.actors.values():
            for model, f in a.get("fallbacks", {}).items():
                g = fallbacks.setdefault(model, {"batches_redone": 0, "running_at_batch_size_1": False})
                g["batches_redone"] += f["batches_redone"]
                g["running_at_batch_size_1"] = g["running_at_batch_size_1"] or f["running_at_batch_size_1"]
        out["batch_fallbacks"] = fallbacks
        firsts = [a["first"] for a in self.actors.values()]
        out["first_batch_s"] = rel(min(firsts)) if firsts else None
        out["last_record_s"] = rel(last_record)
        return out

    @staticmethod
    def lines(summary: dict) -> list[str]:
        """The timeline in time order, one event per line ("+4.1s node ...01 added (CPU 1, GPU 1)")."""
        ev = []
        for n in summary["nodes"]:
            what = f"node {_short(n['node'])} ({_fmt_resources(n['resources'])})"
            if n["added_s"] is not None:
                ev.append((n["added_s"], f"{what} added"))
            if n["removed_s"] is not None:
                ev.append((n["removed_s"], f"{what} removed"))
        for pool, p in summary["pools"].items():
            for i, a in enumerate(p["actors"]):
                ev.append((a["first_batch_s"], f"{pool}: actor {i + 1} first batch (node {_short(a['node'])})"))
            if p["peak_actors"] > 1:
                ev.append((p["peak_at_s"], f"{pool}: {p['peak_actors']} actors working at once"))
        if summary.get("last_record_s") is not None:
            ev.append((summary["last_record_s"], "last record written"))
        return [f"+{t:g}s {text}" for t, text in sorted(ev, key=lambda e: e[0])]


class RunHelper(ClaimTable):
    """The one helper a batch job runs beside its driver: the run's caption claims (`ClaimTable`, used when dedup
    is on) and the model actors' batch reports (`batch`, `events`: a `Timeline`). One process, not two: a second
    helper actor cost the 2-core data plane a worker's start and its share of the CPU."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 2_000_000) -> None:
        super().__init__(ttl, max_entries)
        self.timeline = Timeline()

    def batch(self, *args, **kwargs) -> None:
        self.timeline.batch(*args, **kwargs)

    def events(self) -> list[tuple]:
        return self.timeline.events()
