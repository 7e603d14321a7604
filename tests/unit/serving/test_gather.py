"""The replicas' batcher (`Gather`): an idle model starts a request at once, the requests that queue while it is
busy share its next call, and every call gets its own result, events or error."""

import asyncio

import pytest

from caslie_core.serving.gather import Gather


class Model:
    """A batched function that holds each batch until released, recording the batches it saw."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.release = asyncio.Event()

    async def run(self, xs: list, ys: list) -> list:
        self.batches.append(list(xs))
        await self.release.wait()
        self.release.clear()
        if "bad" in xs:
            raise ValueError("the model broke")
        return [x * y for x, y in zip(xs, ys)]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_idle_model_starts_at_once_and_a_busy_one_gathers_what_queues():
    async def main():
        m = Model()
        seen: list[int] = []
        g = Gather(m.run, max_batch_size=4, on_batch=seen.append)
        first = asyncio.ensure_future(g.call(1, 10))
        await _settle()
        assert m.batches == [[1]]  # no window: a lone request does not wait for company
        rest = [asyncio.ensure_future(g.call(x, 10)) for x in range(2, 8)]
        await _settle()
        assert m.batches == [[1]]  # they wait for the model, not for a timer
        for _ in range(3):
            m.release.set()
            await _settle()
        assert m.batches == [[1], [2, 3, 4, 5], [6, 7]]  # all that queued, up to max_batch_size
        assert [await f for f in [first, *rest]] == [10, 20, 30, 40, 50, 60, 70]
        assert seen == [1, 4, 2]

    asyncio.run(main())


def test_a_window_makes_an_idle_request_wait_for_company_and_errors_reach_every_call():
    async def main():
        m = Model()
        g = Gather(m.run, max_batch_size=8, batch_wait_timeout_s=0.05)
        calls = [asyncio.ensure_future(g.call(1, 1))]
        await asyncio.sleep(0.01)
        calls.append(asyncio.ensure_future(g.call("bad", 1)))
        await asyncio.sleep(0.08)
        assert m.batches == [[1, "bad"]]
        m.release.set()
        for call in calls:
            with pytest.raises(ValueError, match="the model broke"):
                await call
        g.set_batch_wait_timeout_s(0)
        running = asyncio.ensure_future(g.call(2, 1))
        await _settle()
        cancelled = asyncio.ensure_future(g.call(3, 1))  # queued behind a running batch, then given up
        later = asyncio.ensure_future(g.call(4, 1))
        await _settle()
        cancelled.cancel()
        await _settle()
        m.release.set()
        await _settle()
        m.release.set()
        assert await running == 2 and await later == 4
        assert m.batches[-1] == [4]  # the cancelled call was not run

    asyncio.run(main())


def test_streams_get_their_own_rows_end_on_their_own_and_share_a_failure():
    async def steps(prompts: list, fail: list):
        for step in range(3):
            if step == 2 and any(fail):
                raise RuntimeError("device lost")
            yield [StopIteration if (p == "short" and step == 1) else [f"{p}:{step}"] for p in prompts]

    async def main():
        sizes: list[int] = []
        g = Gather(steps, streaming=True, on_batch=sizes.append)

        async def read(prompt, fail=False):
            return [e async for e in g.stream(prompt, fail)]

        got = await asyncio.gather(read("a"), read("short"), read("b"))
        assert got == [[["a:0"], ["a:1"], ["a:2"]], [["short:0"]], [["b:0"], ["b:1"], ["b:2"]]]
        assert sizes == [3]  # calls made in the same turn of the event loop share the first batch
        outcomes = await asyncio.gather(read("c", True), read("short"), return_exceptions=True)
        assert isinstance(outcomes[0], RuntimeError) and outcomes[1] == [["short:0"]]

    asyncio.run(main())
