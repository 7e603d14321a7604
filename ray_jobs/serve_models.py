"""The model deployments of the service (`ray_jobs.serve` builds the app): Captioner, Judge_<name>, Predictor.

Each loads its model once, answers in `@serve.batch` batches, reports itself unhealthy when it fails every item of
several batches in a row, and takes its live settings (batching) through Serve's `user_config` -> `reconfigure()`,
so a tuning change reaches running replicas without reloading a model.
"""

import asyncio
import dataclasses
import uuid
from typing import Any

from ray import serve

from caslie_core import serving as sv
from caslie_core.models.batching import FailureStreak, groups


def _batching(handler, settings) -> None:
    """Apply the configured batch size and wait to a `@serve.batch` method (off = batches of one)."""
    if isinstance(settings, dict):
        from caslie_core.config.serve import BatchingSettings

        settings = BatchingSettings.model_validate(settings)
    handler.set_max_batch_size(settings.max_batch_size if settings.enabled else 1)
    handler.set_batch_wait_timeout_s(settings.wait_timeout_s if settings.enabled else 0.0)


class _Health:
    """Serve's health check over the core's rule (`FailureStreak`): a replica failing every item of several
    batches in a row (a broken device or model) reports itself unhealthy, and Serve replaces it."""

    streak = None

    def _track(self, errors: list) -> None:
        self.streak = self.streak or FailureStreak()
        self.streak.track(errors)

    def check_health(self) -> None:
        if self.streak and self.streak.failing:
            raise RuntimeError(self.streak.reason())

    async def ping(self) -> str:
        return "ok"

    def _live(self, user_config: dict, handler) -> None:
        """The settings a Serve config may change on a running replica (`user_config`): batching."""
        from caslie_core.config.serve import BatchingSettings

        self.live = {"batching": BatchingSettings.model_validate(user_config.get("batching", {})).model_dump()}
        _batching(handler, self.live["batching"])
        if hasattr(getattr(self, "model", None), "batch_size"):
            self.model.batch_size = self.live["batching"]["max_batch_size"]

    async def state(self) -> dict:
        """This replica's id and live settings (tests: a tuning change reaches running replicas)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **getattr(self, "live", {})}


@serve.deployment
class Captioner(_Health):
    def __init__(self, cfg: dict) -> None:
        from caslie_core.config.serve import ServeCaptionerConfig
        from caslie_core.models.captioner import Captioner as Model

        c = ServeCaptionerConfig.model_validate(cfg)
        self.model = Model.from_config(c, batch_size=c.deployment.batching.max_batch_size)

    def reconfigure(self, user_config: dict) -> None:  # live settings: Serve calls this without a restart
        self._live(user_config, self.caption)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def caption(self, pixels: list, prompts: list[str]) -> list[dict]:
        results = await asyncio.to_thread(self.model.caption, pixels, prompts)
        self._track([r.error for r in results])
        return [{"caption": r.caption, "error": r.error} for r in results]


@serve.deployment
class Judge(_Health):
    def __init__(self, cfg: dict) -> None:
        from caslie_core.config.serve import ServeJudgeConfig
        from caslie_core.models.judge import Judge as Model

        j = ServeJudgeConfig.model_validate(cfg)
        self.model = Model.from_config(j, batch_size=j.deployment.batching.max_batch_size)

    def reconfigure(self, user_config: dict) -> None:
        self._live(user_config, self.vote)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def vote(self, questions: list[str]) -> list[dict]:
        votes = await asyncio.to_thread(self.model.vote, questions)
        self._track([v.error for v in votes])
        return [{"vote": v.vote, "error": v.error} for v in votes]


class _Loaded:
    """What the multiplexer keeps per adapter; evicting it (LRU) unloads the adapter from the replica."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name, self.done = model, name, False

    def __del__(self) -> None:
        if not self.done:
            self.done = True
            self.model.unload(self.name)


def predictor_deployment(max_adapters: int):
    """The Predictor deployment class (the multiplexer's capacity is fixed when the class is made)."""

    @serve.deployment(name="Predictor")
    class Predictor(_Health):
        def __init__(self, spec: dict) -> None:
            from caslie_core.models.predictor import AdapterPredictor

            self.model = AdapterPredictor.from_spec(spec)
            self.paths: dict[str, str] = spec["adapters"]
            self.store: str | None = spec.get("store")

        def reconfigure(self, user_config: dict) -> None:
            self._live(user_config, self._answer)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str) -> _Loaded:
            from caslie_core.models.predictor import local_copy

            path = self.paths.get(name) or f"{self.store.rstrip('/')}/{name}"  # the ingress checked the name
            path = await asyncio.to_thread(local_copy, path)
            await asyncio.to_thread(self.model.load, name, path)
            return _Loaded(self.model, name)

        async def _chosen(self) -> str | None:
            """The adapter this request names (Serve's multiplexed model id), loaded; None = the base model."""
            name = serve.get_multiplexed_model_id() or sv.BASE_MODEL_NAME
            if name == sv.BASE_MODEL_NAME:
                return None
            if name not in self.paths and not self.store:
                raise KeyError(f"unknown adapter {name!r}")
            await self.adapter(name)
            return name

        async def predict(self, prompt: str, max_new_tokens: int | None = None, sampling: dict | None = None) -> dict:
            adapter = await self._chosen()
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (sampling or {}).items()))
            if (sampling or {}).get("seed") is not None and (sampling or {}).get("temperature"):
                key += (("solo", uuid.uuid4().hex),)  # a seeded draw is generated alone: the same answer every time
            return await self._answer(prompt, adapter, max_new_tokens, key)

        async def stream(self, prompt: str, max_new_tokens: int | None = None, sampling: dict | None = None):
            """Tokens as they are generated (a Serve streaming call); the caller cancelling it (a client that
            went away) stops the generation at the next token."""
            import threading

            from caslie_core.models.batching import error_text

            adapter = await self._chosen()
            loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

            def pump() -> None:
                try:
                    for event in self.model.stream(prompt, adapter, max_new_tokens, sampling, cancel):
                        loop.call_soon_threadsafe(queue.put_nowait, event)
                except Exception as e:  # noqa: BLE001 - the stream's error event
                    loop.call_soon_threadsafe(queue.put_nowait, {"error": error_text(e)})
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, None)

            loop.run_in_executor(None, pump)
            try:
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                cancel.set()

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
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
            self._track([a["error"] for a in out])
            return out

    return Predictor
