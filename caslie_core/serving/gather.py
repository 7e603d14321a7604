"""Batching for an LLM generation (the predictor replica), asyncio only.

Serve's `@serve.batch` forms a batch from the requests that arrive within `batch_wait_timeout_s` of its first one,
even while the previous batch is still running: under load, a long generation is followed by many small batches
queued behind it, and a lone request on an idle replica waits out the window. An LLM engine does the opposite
(vLLM's scheduler): a request that finds the model idle starts at once, and the requests that arrive during a
generation are all taken into the next one (up to the batch size). `Gather` does that, per replica, for a unary
call (`call`: one result per request) and for a streamed one (`stream`: per decoding step, one list of events per
request); it offers `set_max_batch_size`/`set_batch_wait_timeout_s` as Serve's batch methods do (live settings).
"""

from __future__ import annotations

import asyncio
from collections import deque

_END = object()


class Gather:
    """Runs `fn` (async: lists of the calls' arguments in, one result per call out; `streaming`: an async generator
    yielding, per step, one list of events per call, `StopIteration` in place of a list when that call is over) on
    batches of the calls made to it, one batch at a time. The batch is everything queued when `fn` is free, up to
    `max_batch_size`; `batch_wait_timeout_s` > 0 makes a request that finds it idle wait that long for company."""

    def __init__(
        self, fn, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0, streaming: bool = False, on_batch=None
    ):
        self.fn, self.streaming, self.on_batch = fn, streaming, on_batch  # on_batch(size): each batch run (metrics)
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
            batch = [self.queue.popleft() for _ in range(min(self.max_batch_size, len(self.queue)))]
            live = [(a, o) for a, o in batch if not (isinstance(o, asyncio.Future) and o.done())]  # cancelled
            if live:
                if self.on_batch:
                    self.on_batch(len(live))
                await (self._run_stream(live) if self.streaming else self._run(live))

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
