"""Batching for the model replicas (captioner, judges, predictor), asyncio only.

Serve's `@serve.batch` forms a batch from the requests that arrive within `batch_wait_timeout_s` of its first one,
even while the previous batch is still running: under load, a long generation is followed by many small batches
queued behind it, and a lone request on an idle replica waits out the window. An LLM engine does the opposite
(vLLM's scheduler): a request that finds the model idle starts at once, and the requests that arrive during a
generation are all taken into the next one (up to the batch size). `Gather` does that, per replica, for a unary
call (`call`: one result per request) and for a streamed one (`stream`: per decoding step, one list of events per
request); it offers `set_max_batch_size`/`set_batch_wait_timeout_s` as Serve's batch methods do (live settings).

Where one replica hosts several models (the co-located layouts), their batchers share `Turns`: one batch at a time,
the stage furthest along a request's path first, so the requests move through captioning, judging and answering
together in large batches (tests/unit/serving/test_gather.py: batches of 2-4 without, all 12 clients with).
"""

from __future__ import annotations

import asyncio
from collections import deque

_END = object()
CAPTIONS, VOTES, ANSWERS = 0, 1, 2  # the stages of a request, as `Turns` ranks them


class Gather:
    """Runs `fn` (async: lists of the calls' arguments in, one result per call out; `streaming`: an async generator
    yielding, per step, one list of events per call, `StopIteration` in place of a list when that call is over) on
    batches of the calls made to it, one batch at a time. The batch is everything queued when `fn` is free, up to
    `max_batch_size`; `batch_wait_timeout_s` > 0 makes a request that finds it idle wait that long for company."""

    def __init__(
        self,
        fn,
        *,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        streaming: bool = False,
        on_batch=None,
        turns: Turns | None = None,
        rank: int = 0,
    ):
        self.fn, self.streaming, self.on_batch = fn, streaming, on_batch  # on_batch(size): each batch run (metrics)
        self.turns, self.rank = turns, rank  # shared with the replica's other batchers: one batch at a time
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.queue: deque = deque()
        self.worker: asyncio.Task | None = None

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = n

    def set_batch_wait_timeout_s(self, s: float) -> None:
        self.batch_wait_timeout_s = s

    async def call(self, *args):
        """One call's result (its exception raised here if the batch failed)."""
        done = asyncio.get_running_loop().create_future()
        self._put(args, done)
        return await done

    async def stream(self, *args):
        """One call's events as its batch generates them; an exception of the batch is raised here."""
        events: asyncio.Queue = asyncio.Queue()
        self._put(args, events)
        while (item := await events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, args: tuple, out) -> None:
        self.queue.append((args, out))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        first = True
        while self.queue:
            if first and self.batch_wait_timeout_s > 0 and len(self.queue) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_timeout_s)
            first = False
            if self.turns is not None:
                await self.turns.take(self.rank)
            try:
                batch = [self.queue.popleft() for _ in range(min(self.max_batch_size, len(self.queue)))]
                live = [(a, o) for a, o in batch if not (isinstance(o, asyncio.Future) and o.done())]  # cancelled
                if live:
                    if self.on_batch:
                        self.on_batch(len(live))
                    await (self._run_stream(live) if self.streaming else self._run(live))
            finally:
                if self.turns is not None:
                    await self.turns.give()

    async def _run(self, batch: list) -> None:
        try:
            results = await self.fn(*(list(col) for col in zip(*(args for args, _ in batch))))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except Exception as e:  # noqa: BLE001 - every call of the batch gets it
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        for (_, done), result in zip(batch, results):
            if not done.done():
                done.set_result(result)

    async def _run_stream(self, batch: list) -> None:
        outs = [events for _, events in batch]
        over = [False] * len(batch)
        try:
            async for step in self.fn(*(list(col) for col in zip(*(args for args, _ in batch)))):
                for i, events in enumerate(step):
                    if over[i]:
                        continue
                    if events is StopIteration:
                        over[i] = True
                        outs[i].put_nowait(_END)
                    else:
                        outs[i].put_nowait(events)
        except Exception as e:  # noqa: BLE001 - every unfinished call of the batch gets it
            for i, events in enumerate(outs):
                if not over[i]:
                    events.put_nowait(e)
        finally:
            for i, events in enumerate(outs):
                if not over[i]:
                    events.put_nowait(_END)


class Turns:
    """One model batch at a time among the batchers of a replica that hosts several models (layouts colocated and
    single), the turn going to the stage furthest along a request's path (`rank`: captions 0 < votes 1 < answers 2).

    Left to themselves, the stages of one process run their batches side by side, in threads that share one
    interpreter lock, and the requests in flight spread over the three queues: each batch holds about a third of
    them. Taking turns by rank, the requests one batch finishes reach their next stage before anything else runs,
    so they move through captioning, judging and answering together, in batches as large as the requests waiting
    (an LLM engine prefers running sequences to new ones for the same reason). A batcher passed over `patience`
    times in a row goes next, so no stage waits forever. An idle replica grants a turn at once."""

    def __init__(self, *, patience: int = 3, settle: int = 4) -> None:
        self.patience, self.settle = patience, settle  # settle: loop rounds for the finished requests to move on
        self.busy = False
        self.waiting: list[list] = []  # [rank, times passed over, future]

    async def take(self, rank: int) -> None:
        if not self.busy and not self.waiting:
            self.busy = True
            return
        entry = [rank, 0, asyncio.get_running_loop().create_future()]
        self.waiting.append(entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry in self.waiting:
                self.waiting.remove(entry)
            elif entry[2].done() and not entry[2].cancelled():  # granted as it was cancelled: pass it on
                self._grant()
            raise

    async def give(self) -> None:
        """End a turn: let the requests it finished queue for their next stage, then grant the next turn."""
        try:
            for _ in range(self.settle):
                await asyncio.sleep(0)
        finally:
            self._grant()

    def _grant(self) -> None:
        self.waiting = [e for e in self.waiting if not e[2].done()]
        if not self.waiting:
            self.busy = False
            return
        overdue = [e for e in self.waiting if e[1] >= self.patience]
        chosen = max(overdue or self.waiting, key=lambda e: (e[1], e[0]) if overdue else (e[0], e[1]))
        self.waiting.remove(chosen)
        for e in self.waiting:
            e[1] += 1
        self.busy = True
        chosen[2].set_result(None)
