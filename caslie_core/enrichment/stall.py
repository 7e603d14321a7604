"""Saying why the enrichment plane is not moving, instead of minutes of silence (Ray-free; `ray_jobs.stall` feeds it
Ray Data's operators).

Two states are reported, every `after_s` seconds while they last:
- records have been read but no batch has reached a model pool (actors not started: the cluster has no room for
  them, or they are still loading their model; or the rows are stuck upstream);
- nothing moved at all: no operator received or handed on a row.
The line names the operator holding the rows and what Ray Data says it is waiting for (backpressure, actors
pending, resources, queued blocks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpView:
    """One operator of the running dataset, as counted by Ray Data."""

    name: str
    rows_in: int  # rows it received (the reader: rows it read)
    rows_out: int  # rows taken from it by the next operator
    queued_blocks: int  # blocks waiting at its input
    model_pool: bool  # an actor pool (the captioner, a judge, the shared models)
    detail: str  # Ray Data's own account: tasks, backpressure, actors, queued blocks, resources


class StallWatch:
    def __init__(self, after_s: float, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.after_s, self.say, self.clock = after_s, say, clock
        self._counts: tuple | None = None
        self._moved = self._first_read = self._said = None

    def see(self, ops: list[OpView]) -> str | None:
        """Look at the operators now; say (and return) a line when the plane is stalled."""
        if not ops or self.after_s <= 0:
            return None
        now = self.clock()
        counts = tuple((o.rows_in, o.rows_out) for o in ops)
        if counts != self._counts:
            self._counts, self._moved = counts, now
        read = ops[0].rows_in
        if read and self._first_read is None:
            self._first_read = now
        pools = [o for o in ops if o.model_pool]
        starved = pools and read and not any(o.rows_in for o in pools) and now - self._first_read >= self.after_s
        still = now - self._moved >= self.after_s
        if not (starved or still) or (self._said is not None and now - self._said < self.after_s):
            return None
        self._said = now
        line = self.line(ops, starved, now - (self._first_read if starved else self._moved))
        self.say(line)
        return line

    @staticmethod
    def line(ops: list[OpView], starved: bool, seconds: float) -> str:
        """The operator holding the most rows (received or read, not yet handed on), or the first with queued
        input, and Ray Data's account of each operator that holds any (and of the model pools, when they got none)."""
        held = [(o.rows_in - o.rows_out, o.queued_blocks, i) for i, o in enumerate(ops)]
        _, _, at = max(held, key=lambda h: (h[0], h[1], -h[2]))
        if not held[at][0] and not held[at][1]:
            at = next((i for i, o in enumerate(ops) if o.model_pool), len(ops) - 1)
        what = (
            f"{ops[0].rows_in:,} records read but no batch has reached a model pool for {seconds:.0f} s"
            if starved
            else f"no operator moved a row for {seconds:.0f} s"
        )
        shown = [i for i, o in enumerate(ops) if held[i][0] or held[i][1] or i == at or (starved and o.model_pool)]
        waits = "; ".join(f"{ops[i].name}: {ops[i].detail}" for i in shown)
        return f"[enrich] stalled: {what}; rows wait at {ops[at].name}. Ray Data says: {waits}"
