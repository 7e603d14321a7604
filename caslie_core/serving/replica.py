"""The models of one service replica, without Ray: each model part batches the calls of concurrent requests
(`gather.Gather`) and reports its item errors to the replica's health rule.

- `CaptionPart`: context-conditioned captions (`many`: all images of one request);
- `PanelPart`: one judge or several (`many`: every judge's {vote, error} on each question of a request);
- `AnswerPart`: the base model with its LoRA adapters, answers batched (`answer`) or streamed (`stream`), rows that
  decode differently (adapter, token cap, sampling) generated one group after another;
- `LocalEngine`: the parts of one process as an engine (`engine.Engine`): what the co-located Models deployment
  runs, and layout single runs inside the ingress's own replica.

A `Replica` gives its parts their batchers (sharing `Turns` where several models share a replica: the stage
furthest along a request's path batches first), the health rule (`FailureStreak`) and the live batch settings.
What Ray adds (the batch-size and fallback metrics, Serve's adapter multiplexing) comes in as callbacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import Any

from ..models.batching import FailureStreak, error_text, groups
from .api import BASE_MODEL_NAME
from .engine import Decoding, PipelineEngine, Stream
from .gather import ANSWERS, CAPTIONS, VOTES, Gather, Turns


class Replica:
    """What the model parts of one replica share: batchers (taking `turns` when several models share it), the
    health rule, and the live batch settings. `on_batch(label, n)` and `on_fallbacks(model, n)` are the metrics."""

    def __init__(self, *, shared: bool = False, on_batch=None, on_fallbacks=None) -> None:
        self.turns = Turns() if shared else None
        self.on_batch, self.on_fallbacks = on_batch, on_fallbacks
        self.streak = FailureStreak()
        self.batchers: list[Gather] = []
        self.models: list[Any] = []

    def gather(self, fn, label: str, *, rank: int = 0, streaming: bool = False) -> Gather:
        """A batcher for `fn`; streams never take turns (a long stream must not hold the other models)."""
        on_batch = (lambda n: self.on_batch(label, n)) if self.on_batch else None
        g = Gather(fn, streaming=streaming, on_batch=on_batch, turns=None if streaming else self.turns, rank=rank)
        self.batchers.append(g)
        return g

    def track(self, errors: list, model=None) -> None:
        """A model call's item errors (the health rule) and its batches redone item by item (the metric)."""
        self.streak.track(errors)
        if self.on_fallbacks and (counts := getattr(model, "fallbacks", None)) is not None:
            self.on_fallbacks(counts.model, counts.take())

    def problem(self) -> str | None:
        """Why this replica should be replaced (it failed every item of several batches in a row), or None."""
        return self.streak.reason() if self.streak.failing else None

    def set_batching(self, max_batch_size: int, wait_timeout_s: float) -> None:
        for g in self.batchers:
            g.set_max_batch_size(max_batch_size)
            g.set_batch_wait_timeout_s(wait_timeout_s)
        for model in self.models:
            if hasattr(model, "batch_size"):
                model.batch_size = max_batch_size


class CaptionPart:
    def __init__(self, model, replica: Replica) -> None:
        self.model, self.replica = model, replica
        replica.models.append(model)
        self.batcher = replica.gather(self._batch, "captioner", rank=CAPTIONS)

    async def _batch(self, pixels: list, prompts: list[str]) -> list[dict]:
        results = await asyncio.to_thread(self.model.caption, pixels, prompts)
        self.replica.track([r.error for r in results], self.model)
        return [{"caption": r.caption, "error": r.error} for r in results]

    async def many(self, pixels: list, prompts: list[str]) -> list[dict]:
        return list(await asyncio.gather(*(self.batcher.call(p, q) for p, q in zip(pixels, prompts))))


class PanelPart:
    """Judges in one replica (the whole panel, or one judge of layout split): every judge votes on each question of
    a batch; a judge's error is that image's (`ImageSlot.take_vote`), never an abstention."""

    def __init__(self, judges: dict, replica: Replica, *, label: str = "panel") -> None:
        self.judges, self.replica = judges, replica
        replica.models.extend(judges.values())
        self.batcher = replica.gather(self._batch, label, rank=VOTES)

    async def _batch(self, questions: list[str]) -> list[dict]:
        out: list[dict] = [{} for _ in questions]
        for name, judge in self.judges.items():
            votes = await asyncio.to_thread(judge.vote, questions)
            self.replica.track([v.error for v in votes], judge)
            for row, v in zip(out, votes):
                row[name] = {"vote": v.vote, "error": v.error}
        return out

    async def many(self, questions: list[str]) -> list[dict]:
        return list(await asyncio.gather(*(self.batcher.call(q) for q in questions)))


def _key(decoding: Decoding) -> tuple:
    """A request's decoding as a batch key: requests decoded alike share a batch; a seeded draw is generated alone
    (the same answer every time)."""
    sampling = decoding.sampling or {}
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in sampling.items()))
    if sampling.get("seed") is not None and sampling.get("temperature"):
        key += (("solo", uuid.uuid4().hex),)
    return key


class AnswerPart:
    """A base model and its adapters (`models.predictor.AdapterPredictor`). `load_adapter(name)` (async) makes an
    adapter loaded on this replica (Serve's model multiplexing in a deployment)."""

    def __init__(self, model, replica: Replica, load_adapter) -> None:
        self.model, self.replica, self.load_adapter = model, replica, load_adapter
        replica.models.append(model)
        self.answers = replica.gather(self._answers, "predictor", rank=ANSWERS)
        self.streams = replica.gather(self._streams, "predictor", streaming=True)

    async def _adapter(self, decoding: Decoding) -> str | None:
        if decoding.model == BASE_MODEL_NAME:
            return None
        await self.load_adapter(decoding.model)
        return decoding.model

    async def _loaded(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.model.loaded:  # evicted while queued
            await self.load_adapter(adapter)

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        adapter = await self._adapter(decoding)
        return await self.answers.call(prompt, adapter, decoding.limit, _key(decoding))

    async def stream(self, prompt: str, decoding: Decoding):
        """Events as the answer is generated, together with the other streams queued at the same time; the caller
        closing it (a client that went away) ends this row's generation at the next token."""
        adapter = await self._adapter(decoding)
        cancel = threading.Event()
        try:
            async for events in self.streams.stream(prompt, adapter, decoding.limit, _key(decoding), cancel):
                for event in events:
                    yield event
        finally:
            cancel.set()

    async def _answers(self, prompts: list[str], adapters: list, limits: list, keys: list) -> list[dict]:
        out: list[Any] = [None] * len(prompts)
        for (adapter, limit, key), idx in groups(zip(adapters, limits, keys)).items():
            await self._loaded(adapter)
            settings = {k: v for k, v in key if k != "solo"}
            answers = await asyncio.to_thread(self.model.answer, [prompts[i] for i in idx], adapter, limit, settings)
            for i, a in zip(idx, answers):
                out[i] = dataclasses.asdict(a)
        self.replica.track([a["error"] for a in out], self.model)
        return out

    async def _streams(self, prompts: list, adapters: list, limits: list, keys: list, cancels: list):
        """A batch of streams: each decoding step yields one list of events per request (`Gather.stream`)."""
        from ..models.streaming import generate_streams

        loop = asyncio.get_running_loop()
        for (adapter, limit, key), idx in groups(zip(adapters, limits, keys)).items():
            await self._loaded(adapter)
            steps: asyncio.Queue = asyncio.Queue()
            settings = {k: v for k, v in key if k != "solo"}

            def pump(idx=idx, adapter=adapter, limit=limit, settings=settings, steps=steps) -> None:
                try:  # each step goes from the generating thread straight to this loop
                    generate_streams(
                        self.model,
                        [prompts[i] for i in idx],
                        lambda step: loop.call_soon_threadsafe(steps.put_nowait, step),
                        adapter,
                        limit,
                        settings,
                        [cancels[i] for i in idx],
                    )
                except Exception as err:  # noqa: BLE001 - every row of the group gets the error
                    loop.call_soon_threadsafe(steps.put_nowait, [[{"error": error_text(err)}]] * len(idx))
                finally:
                    loop.call_soon_threadsafe(steps.put_nowait, None)

            loop.run_in_executor(None, pump)
            errors: dict[int, str] = {}
            while (step := await steps.get()) is not None:
                out: list[Any] = [[] for _ in prompts]
                for i, events in zip(idx, step):
                    out[i] = events
                    if failed := [e["error"] for e in events if "error" in e]:
                        errors[i] = failed[0]
                yield out
            self.replica.track([errors.get(i) for i in idx])
            yield [StopIteration if i in idx else [] for i in range(len(prompts))]  # this group's rows end


class LocalEngine(PipelineEngine):
    """The parts of one process as an engine: captions, votes and answers without a deployment call."""

    def __init__(self, replica: Replica, captioner: CaptionPart, panel: PanelPart, answerer: AnswerPart) -> None:
        self.replica, self.captioner, self.panel, self.answerer = replica, captioner, panel, answerer

    async def captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        return await self.captioner.many(pixels, prompts)

    async def votes(self, questions: list[str]) -> list[dict]:
        return await self.panel.many(questions)

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        return await self.answerer.answer(prompt, decoding)

    def stream(self, prompt: str, decoding: Decoding) -> Stream:
        return Stream(self.answerer.stream(prompt, decoding))

    async def health(self) -> dict[str, str]:
        return {"Models": self.replica.problem() or "ok"}


def adapter_loader(model, paths: dict[str, str], store: str | None):
    """`load(name)` (async) for an `AnswerPart`: the adapter from the config's folders or the adapter store, loaded
    into `model`; it returns a handle whose deletion unloads it (Serve's multiplexer evicts least recently used)."""

    async def load(name: str) -> _Loaded:
        from ..models.predictor import local_copy

        if name not in paths and not store:
            raise KeyError(f"unknown adapter {name!r}")
        path = paths.get(name) or f"{store.rstrip('/')}/{name}"
        path = await asyncio.to_thread(local_copy, path)
        await asyncio.to_thread(model.load, name, path)
        return _Loaded(model, name)

    return load


class _Loaded:
    """What the multiplexer keeps per adapter; evicting it (LRU) unloads the adapter from the replica."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name, self.done = model, name, False

    def __del__(self) -> None:
        if not self.done:
            self.done = True
            self.model.unload(self.name)
