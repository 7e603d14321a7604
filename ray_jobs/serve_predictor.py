"""The Predictor deployment (base model + adapters, multiplexed; answers batched, or streamed token by token), the
co-located Models replica (layout colocated: captioner, judge panel and predictor in one replica) and the same
Models object inside the ingress's own replica (layout single: `InProcess`, no deployment call at all)."""

import asyncio
import contextlib
import dataclasses
import time
import uuid
from typing import Any

from ray import serve

from caslie_core import serving as sv
from caslie_core.models.batching import groups
from caslie_core.serving.gather import ANSWERS, Turns

from .serve_models import CaptionerRole, PanelRole, _gather, _Health


class _Loaded:
    """What the multiplexer keeps per adapter; evicting it (LRU) unloads the adapter from the replica."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name, self.done = model, name, False

    def __del__(self) -> None:
        if not self.done:
            self.done = True
            self.model.unload(self.name)


def predictor_deployment(max_adapters: int, *, colocated: bool = False):
    """The Predictor deployment (the multiplexer's capacity is fixed when the class is made); `colocated`: the
    Models deployment, which also captions and judges (`enrich`: one call for all of a request's images;
    `answer_enriched`: one call for the whole of a /v1/predict or an unstreamed chat)."""

    class Predictor(_Health):
        def __init__(self, spec: dict) -> None:
            from caslie_core.models.predictor import AdapterPredictor

            self.model = AdapterPredictor.from_spec(spec)
            self.answers = _gather(self._answer, "predictor", turns=self.turns, rank=ANSWERS)
            self.streams = _gather(self._streams, "predictor", streaming=True)
            self.paths: dict[str, str] = spec["adapters"]
            self.store: str | None = spec.get("store")

        def reconfigure(self, user_config: dict) -> None:
            self._live(user_config, self.answers, self.streams)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str) -> _Loaded:
            from caslie_core.models.predictor import local_copy

            path = self.paths.get(name) or f"{self.store.rstrip('/')}/{name}"  # the ingress checked the name
            path = await asyncio.to_thread(local_copy, path)
            await asyncio.to_thread(self.model.load, name, path)
            return _Loaded(self.model, name)

        async def _chosen(self) -> str | None:
            """The adapter this request names (Serve's multiplexed model id), loaded; None = the base model."""
            name = sv.CHOSEN_MODEL.get() or serve.get_multiplexed_model_id() or sv.BASE_MODEL_NAME
            if name == sv.BASE_MODEL_NAME:
                return None
            if name not in self.paths and not self.store:
                raise KeyError(f"unknown adapter {name!r}")
            await self.adapter(name)
            return name

        @staticmethod
        def _key(sampling: dict | None) -> tuple:
            """A request's decoding as a batch key: requests decoded alike share a batch; a seeded draw is
            generated alone (the same answer every time)."""
            sampling = sampling or {}
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in sampling.items()))
            if sampling.get("seed") is not None and sampling.get("temperature"):
                key += (("solo", uuid.uuid4().hex),)
            return key

        async def predict(self, prompt: str, max_new_tokens: int | None = None, sampling: dict | None = None) -> dict:
            adapter = await self._chosen()
            return await self.answers.call(prompt, adapter, max_new_tokens, self._key(sampling))

        async def stream(self, prompt: str, max_new_tokens: int | None = None, sampling: dict | None = None):
            """Tokens as they are generated (a Serve streaming call), generated together with the other streams
            queued at the same time (`_streams`); the caller cancelling the call (a client that went away) ends this
            row's generation at the next token."""
            import threading

            adapter = await self._chosen()
            cancel = threading.Event()
            try:
                async for events in self.streams.stream(prompt, adapter, max_new_tokens, self._key(sampling), cancel):
                    for event in events:
                        yield event
            finally:
                cancel.set()

        async def _streams(self, prompts: list, adapters: list, limits: list, samplings: list, cancels: list):
            """A batch of streams: each decoding step yields one list of events per request (`Gather.stream`);
            rows that decode differently (adapter, cap, sampling) run one group after another."""
            from caslie_core.models.batching import error_text
            from caslie_core.models.streaming import generate_streams

            loop = asyncio.get_running_loop()
            for (adapter, limit, sampling), idx in groups(zip(adapters, limits, samplings)).items():
                if adapter is not None and adapter not in self.model.loaded:  # evicted while queued
                    await self.adapter(adapter)
                steps: asyncio.Queue = asyncio.Queue()
                settings = {k: v for k, v in sampling if k != "solo"}

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
                        failed = [[{"error": error_text(err)}]] * len(idx)
                        loop.call_soon_threadsafe(steps.put_nowait, failed)
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
                self._track([errors.get(i) for i in idx])
                yield [StopIteration if i in idx else [] for i in range(len(prompts))]  # this group's rows end

        async def _answer(self, prompts: list[str], adapters: list, limits: list, samplings: list) -> list[dict]:
            out: list[Any] = [None] * len(prompts)
            for (adapter, limit, sampling), idx in groups(zip(adapters, limits, samplings)).items():
                if adapter is not None and adapter not in self.model.loaded:  # evicted while queued
                    await self.adapter(adapter)
                settings = {k: v for k, v in sampling if k != "solo"}
                answers = await asyncio.to_thread(
                    self.model.answer, [prompts[i] for i in idx], adapter, limit, settings
                )
                for i, a in zip(idx, answers):
                    out[i] = dataclasses.asdict(a)
            self._track([a["error"] for a in out], self.model)
            return out

    if not colocated:
        return serve.deployment(name="Predictor")(Predictor)

    class Models(Predictor, CaptionerRole, PanelRole):
        def __init__(self, spec: dict, captioner: dict, judges: list[dict]) -> None:
            self.turns = Turns()  # one model batch at a time, the stage furthest along first (streams apart)
            super().__init__(spec)
            self._load_captioner(captioner)
            self._load_judges(judges)

        def reconfigure(self, user_config: dict) -> None:
            self._live(user_config, self.answers, self.streams, self.caption, self.votes)

        async def enrich(self, slots: list, questions_of) -> tuple[list, dict]:
            """Caption a request's images, ask the panel about the captions (`questions_of(slots)`: the
            core's question builder for a record or a chat), in one call; the slots back, with stage times."""
            times = await sv.caption_and_judge(slots, questions_of, self.caption_many, self.vote_many, {})
            return slots, times

        async def answer_enriched(self, slots: list, questions_of, prompt_of, limit=None, sampling=None):
            """Enrich, then answer, in one call (a /v1/predict, a chat not streamed): a request's images captioned
            and judged (`questions_of(slots)`), its prompt built from them (`prompt_of(slots)`; both the core's
            builders for a record or a chat) and answered with the adapter the request names (the multiplexed
            model id); the slots, the answer and stage seconds back."""
            times = await sv.caption_and_judge(slots, questions_of, self.caption_many, self.vote_many, {})
            t = time.perf_counter()
            answer = await self.predict(prompt_of(slots), limit, sampling)
            times["predict"] = time.perf_counter() - t
            return slots, answer, times

    return serve.deployment(name="Models")(Models)


def models_args(cfg, spec: dict) -> list:
    """The Models object's init arguments (layouts colocated and single), from the service's config and `app_spec`:
    the multiplexer's capacity, the predictor's spec, the captioner's and the judges' sections without their
    deployment settings (options of the deployment, never init arguments: a change to them reloads no model)."""
    bare = {"deployment"}
    captioner = cfg.captioner.model_dump(mode="json", exclude=bare)
    judges = [j.model_dump(mode="json", exclude=bare) for j in cfg.judges]
    return [cfg.model.max_adapters_per_replica, spec["predictor"], captioner, judges]


class InProcess:
    """Layout single: the Models object built in the ingress's own replica, called with the shape of the handle it
    replaces (`.options(multiplexed_model_id=..., stream=...)`, `.METHOD.remote(...)`: awaitable, or when
    streaming an async iterator with `cancel()`), so that a request makes no deployment call at all."""

    def __init__(self, target, model_id: str = "", stream: bool = False) -> None:
        self.target, self.model_id, self.streaming = target, model_id, stream

    @classmethod
    def build(cls, max_adapters: int, spec: dict, captioner: dict, judges: list[dict]) -> "InProcess":
        models = predictor_deployment(max_adapters, colocated=True).func_or_class
        return cls(models(spec, captioner, judges))

    def options(self, *, multiplexed_model_id: str = "", stream: bool = False) -> "InProcess":
        return InProcess(self.target, multiplexed_model_id, stream)

    def __getattr__(self, name: str):
        method = getattr(self.target, name)
        return _Call(method, self.model_id, self.streaming)


class _Call:
    def __init__(self, method, model_id: str, streaming: bool) -> None:
        self.method, self.model_id, self.streaming = method, model_id, streaming
        self.events = None

    def remote(self, *args):
        if not self.streaming:
            return self._call(*args)
        self.events = self._stream(*args)
        return self

    async def _call(self, *args):
        sv.CHOSEN_MODEL.set(self.model_id)  # in the calling request's own context
        return await self.method(*args)

    async def _stream(self, *args):
        sv.CHOSEN_MODEL.set(self.model_id)
        async with contextlib.aclosing(self.method(*args)) as events:  # closed at once when the client goes
            async for event in events:
                yield event

    def __aiter__(self):
        return self.events

    def cancel(self) -> None:
        """The client went away: closing the stream ends its row of the generation at the next token."""
        asyncio.ensure_future(self.events.aclose())
