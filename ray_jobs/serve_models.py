"""The model deployments of the service (`ray_jobs.serve` builds the app, `ServeConfig.layout` picks which):
Captioner, Judge_<name> (layout split), Panel (all judges in one replica, layout panel); the Predictor and the
co-located Models replica are in `serve_predictor`.

Each loads its model once, answers in batches (`caslie_core.serving.gather.Gather`: a request that finds the model
idle starts at once, the requests that queue while it is busy form the next batch), reports itself unhealthy when
it fails every item of several batches in a row, and takes its live settings (batching) through Serve's
`user_config` -> `reconfigure()`, so a tuning change reaches running replicas without reloading a model.
"""

import asyncio

from ray import serve

from caslie_core.models.batching import FailureStreak
from caslie_core.serving.gather import CAPTIONS, VOTES, Gather

from . import counters, metrics


def _gather(fn, model: str, *, streaming: bool = False, turns=None, rank: int = 0) -> Gather:
    """A replica's batcher for `fn`, its batch sizes recorded as caslie_serve_batch_size{model}; `turns`: shared
    with the other models of a co-located replica (`gather.Turns`, `rank` the stage)."""
    return Gather(
        fn,
        streaming=streaming,
        on_batch=lambda n: metrics.observe("caslie_serve_batch_size", n, model=model),
        turns=turns,
        rank=rank,
    )


def _batching(handler, settings) -> None:
    """Apply the configured batch size and wait to a batcher (`Gather`; off = batches of one)."""
    if isinstance(settings, dict):
        from caslie_core.config.serve import BatchingSettings

        settings = BatchingSettings.model_validate(settings)
    handler.set_max_batch_size(settings.max_batch_size if settings.enabled else 1)
    handler.set_batch_wait_timeout_s(settings.wait_timeout_s if settings.enabled else 0.0)


class _Health:
    """Serve's health check over the core's rule (`FailureStreak`): a replica failing every item of several
    batches in a row (a broken device or model) reports itself unhealthy, and Serve replaces it."""

    streak = None
    turns = None  # the co-located Models replica's `gather.Turns`: its models take turns

    def _track(self, errors: list, model=None) -> None:
        """A model call's item errors (the health rule), and its batches redone item by item (the metric)."""
        self.streak = self.streak or FailureStreak()
        self.streak.track(errors)
        if (counts := getattr(model, "fallbacks", None)) is not None:  # at zero first: a first fallback is seen
            self.redone = getattr(self, "redone", None) or counters.Counts()
            self.redone.add("caslie_batch_fallbacks_total", counts.take(), model=counts.model)

    def check_health(self) -> None:
        if self.streak and self.streak.failing:
            raise RuntimeError(self.streak.reason())

    async def ping(self) -> str:
        return "ok"

    def _live(self, user_config: dict, *handlers) -> None:
        """The settings a Serve config may change on a running replica (`user_config`): batching."""
        from caslie_core.config.serve import BatchingSettings

        self.live = {"batching": BatchingSettings.model_validate(user_config.get("batching", {})).model_dump()}
        for handler in handlers:
            _batching(handler, self.live["batching"])
        for model in [
            getattr(self, "model", None),
            getattr(self, "captioner", None),
            *getattr(self, "judges", {}).values(),
        ]:
            if hasattr(model, "batch_size"):
                model.batch_size = self.live["batching"]["max_batch_size"]

    async def state(self) -> dict:
        """This replica's id and live settings (tests: a tuning change reaches running replicas)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **getattr(self, "live", {})}


class CaptionerRole(_Health):
    """Context-conditioned captions; all images of one request in one call (`caption_many`), batched with
    other requests' images by `Gather`."""

    def _load_captioner(self, cfg: dict) -> None:
        from caslie_core.config.serve import ServeCaptionerConfig
        from caslie_core.models.captioner import Captioner as Model

        c = ServeCaptionerConfig.model_validate(cfg)
        self.captioner = Model.from_config(c, batch_size=c.deployment.batching.max_batch_size)
        self.caption = _gather(self._captions, "captioner", turns=self.turns, rank=CAPTIONS)

    async def _captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        results = await asyncio.to_thread(self.captioner.caption, pixels, prompts)
        self._track([r.error for r in results], self.captioner)
        return [{"caption": r.caption, "error": r.error} for r in results]

    async def caption_many(self, pixels: list, prompts: list[str]) -> list[dict]:
        return list(await asyncio.gather(*(self.caption.call(p, q) for p, q in zip(pixels, prompts))))


class PanelRole(_Health):
    """The whole judge panel in one replica: every judge votes on each question of a batch, so one call per
    request answers all its questions by all judges (`vote_many` -> one {judge: {vote, error}} per question)."""

    def _load_judges(self, cfgs: list[dict]) -> None:
        from caslie_core.config.serve import ServeJudgeConfig
        from caslie_core.models.judge import Judge as Model

        judges = [ServeJudgeConfig.model_validate(c) for c in cfgs]
        self.judges = {j.name: Model.from_config(j, batch_size=j.deployment.batching.max_batch_size) for j in judges}
        self.votes = _gather(self._votes, "panel", turns=self.turns, rank=VOTES)

    async def _votes(self, questions: list[str]) -> list[dict]:
        out: list[dict] = [{} for _ in questions]
        for name, judge in self.judges.items():
            votes = await asyncio.to_thread(judge.vote, questions)
            self._track([v.error for v in votes], judge)
            for row, v in zip(out, votes):
                row[name] = {"vote": v.vote, "error": v.error}  # an error is the image's (`ImageSlot.take_vote`)
        return out

    async def vote_many(self, questions: list[str]) -> list[dict]:
        return list(await asyncio.gather(*(self.votes.call(q) for q in questions)))


@serve.deployment
class Captioner(CaptionerRole):
    def __init__(self, cfg: dict) -> None:
        self._load_captioner(cfg)

    def reconfigure(self, user_config: dict) -> None:  # live settings: Serve calls this without a restart
        self._live(user_config, self.caption)


@serve.deployment
class Panel(PanelRole):
    def __init__(self, judges: list[dict]) -> None:
        self._load_judges(judges)

    def reconfigure(self, user_config: dict) -> None:
        self._live(user_config, self.votes)


@serve.deployment
class Judge(_Health):
    """One judge of the panel (layout split: each judge sized and scaled on its own)."""

    def __init__(self, cfg: dict) -> None:
        from caslie_core.config.serve import ServeJudgeConfig
        from caslie_core.models.judge import Judge as Model

        j = ServeJudgeConfig.model_validate(cfg)
        self.name = j.name
        self.model = Model.from_config(j, batch_size=j.deployment.batching.max_batch_size)
        self.vote = _gather(self._vote, f"judge_{self.name}")

    def reconfigure(self, user_config: dict) -> None:
        self._live(user_config, self.vote)

    async def _vote(self, questions: list[str]) -> list[dict]:
        votes = await asyncio.to_thread(self.model.vote, questions)
        self._track([v.error for v in votes], self.model)
        return [{"vote": v.vote, "error": v.error} for v in votes]

    async def vote_many(self, questions: list[str]) -> list[dict]:
        """All questions of a request in one call: one {name: {vote, error}} each, as the Panel answers."""
        return [{self.name: r} for r in await asyncio.gather(*(self.vote.call(q) for q in questions))]
