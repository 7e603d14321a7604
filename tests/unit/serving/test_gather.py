"""The replicas' batcher (`Gather`): an idle model starts a request at once, the requests that queue while it is
busy share its next call, and every call gets its own result, events or error."""

import asyncio

import pytest

from caslie_core.serving.gather import Gather, Turns


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


def test_stages_taking_turns_never_overlap_and_move_their_requests_together():
    """Clients arriving at different times, three stages per request (as captions, votes and answers in one
    replica), a closed loop: taking turns by rank, one batch runs at a time and the cohorts merge, so the last
    batches come to hold every client; without turns, stages overlap and batches stay split."""

    async def run(turns):
        running, most, sizes = [0], [0], {0: [], 1: [], 2: []}

        def stage(rank):
            async def fn(xs):
                running[0] += 1
                most[0] = max(most[0], running[0])
                sizes[rank].append(len(xs))
                await asyncio.sleep(0.01)
                running[0] -= 1
                return xs

            return Gather(fn, max_batch_size=64, turns=turns, rank=rank)

        stages = [stage(r) for r in range(3)]

        async def client(i):
            await asyncio.sleep(0.003 * i)
            for _ in range(6):
                for s in stages:
                    assert await s.call(i) == i

        await asyncio.gather(*(client(i) for i in range(12)))
        return most[0], sizes

    most, sizes = asyncio.run(run(Turns()))
    assert most == 1  # one batch at a time
    assert all(max(sizes[r]) == 12 for r in range(3))  # the cohorts merged: every client in one batch
    most_apart, apart = asyncio.run(run(None))
    assert most_apart > 1  # left to themselves, the stages overlap ...
    assert max(apart[0]) < 12 and len(apart[0]) > 2 * len(sizes[0])  # ... and their batches stay small


def test_a_stage_passed_over_goes_next_after_patience_turns_and_a_cancelled_waiter_is_skipped():
    async def main():
        turns = Turns(patience=2)
        order: list[str] = []
        await turns.take(2)  # busy

        async def wait(name, rank):
            await turns.take(rank)
            order.append(name)

        asyncio.ensure_future(wait("low", 0))
        gone = asyncio.ensure_future(wait("gone", 2))
        await _settle()
        gone.cancel()
        for n in range(4):  # a higher-ranked stage keeps asking
            asyncio.ensure_future(wait(f"high{n}", 2))
            await _settle()
            await turns.give()
            await _settle()
        assert order[:3] == ["high0", "high1", "low"]  # low passed over twice, then first
        assert gone.cancelled() and "gone" not in order
        while turns.busy:
            await turns.give()
        assert turns.waiting == [] and not turns.busy

    asyncio.run(main())
