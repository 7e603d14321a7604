"""The enrichment job's model actors: thin Ray shims over `caslie_core.enrichment.stages`.

split pools: a `CaptionActor` pool, then a `JudgeActor` pool per judge; shared (`model_pools: shared`): one
`ModelsActor` pool whose actors run the captioner and every judge in turn on each batch."""

from __future__ import annotations

import functools
import time

from caslie_core.enrichment import outcomes, stages
from caslie_core.enrichment.stored import OnFirstCall, ResultWriter, StoreUse

from . import counters, metrics
from .actors import CaptionCacheClient, actor_id
from .timeline import TimelineClient


class _Timed:
    """Each batch's seconds into `caslie_enrich_stage_batches_total{stage, le}`; each batch done told to the job's timeline
    (`timeline`: the named actor and this pool's config key) with its models' batches redone item by item (the
    job's summary counts them) and what the batch did (`outcomes.count`): the helper records both, as
    `caslie_batch_fallbacks_total{model}` and `caslie_enrich_stage_images_total{stage, outcome}`."""

    metric_stage = "model"
    timeline: TimelineClient | None = None
    counting: dict = {}  # `outcomes.count`'s keywords for this pool

    def __call__(self, batch):
        t = time.perf_counter()
        try:
            out = super().__call__(batch)
        finally:
            counters.batch_seconds(self.metric_stage, time.perf_counter() - t)
        fallbacks = stages.take_fallbacks(self.stage)
        if self.timeline is None:  # a pool run without the job's helper (an embedder): recorded here
            for model, (n, _) in fallbacks.items():
                metrics.inc("caslie_batch_fallbacks_total", n, model=model)
        elif batch.num_rows:
            self.timeline.batch(batch.num_rows, fallbacks, outcomes.count(out, **self.counting))
        return out

    def follow(self, timeline, **counting) -> None:
        """Report to `timeline` ((the helper's name and namespace), the pool's key, and for the first pool
        `first=(fetched,)`), counting this pool's outcomes (`counting`: `outcomes.count`'s caption/judges)."""
        if not timeline:
            return
        first = timeline[2] if len(timeline) > 2 else None
        self.counting = dict(counting, arrivals=first is not None, fetched=bool(first and first[0]))
        self.timeline = TimelineClient(tuple(timeline[0]), timeline[1])

    def __del__(self) -> None:  # Ray Data retires the actor: its last batches reach the timeline and the metrics
        counters.here().flush()
        if self.timeline is not None:
            self.timeline.flush(wait_s=2.0)


def _caption_stage(captioner: dict, size: int, cache, wait_s: float, factory, store: StoreUse | None = None):
    """With a `store` that reads, the captioner loads on its first miss; with one that writes, captions are kept."""
    from caslie_core.config import CaptionerConfig
    from caslie_core.models.registry import build_captioner

    make = factory or (lambda: build_captioner(CaptionerConfig.model_validate(captioner)))
    model = OnFirstCall(make) if store is not None and store.reads else make()
    client = CaptionCacheClient(*cache) if cache else None
    writer = ResultWriter(store) if store is not None and store.writes else None
    return stages.CaptionStage(model, size, client, owner=actor_id(), wait_s=wait_s, results=writer)


def _judge_stage(judge: dict, factory=None, store: StoreUse | None = None) -> stages.JudgeStage:
    """A judge section's stage; its model from `factory` when given (tests, embedders), else the config. With a
    `store` that reads, the model loads on its first miss; with one that writes, new votes are stored."""
    from caslie_core.config import JudgeConfig
    from caslie_core.models.registry import build_judge

    j = JudgeConfig.model_validate(judge)
    make = factory or (lambda: build_judge(j))
    model = OnFirstCall(make) if store is not None and store.reads else make()
    writer = ResultWriter(store) if store is not None and store.writes else None
    return stages.JudgeStage(model, j.name, judge_missing=j.reply == "research", results=writer)


def _models_stage(caption: dict | None, judges: list[dict], factories: dict, store: StoreUse | None):
    chain = [_caption_stage(**caption, factory=factories.get("captioner"))] if caption else []
    return stages.Chain(chain + [_judge_stage(j, factories.get(j["name"]), store) for j in judges])


class CaptionActor(_Timed, stages.Deferred):  # `lazy` on a resume: a finished catalog never loads a model
    metric_stage = "caption"

    def __init__(
        self, captioner: dict, size: int, cache, wait_s: float, factory=None, store=None, lazy=False, timeline=None
    ):
        make = functools.partial(_caption_stage, captioner, size, cache, wait_s, factory, store)
        super().__init__(make, lazy=lazy)
        self.follow(timeline, caption=True)


class JudgeActor(_Timed, stages.Deferred):
    metric_stage = "judge"

    def __init__(self, judge: dict, factory=None, store=None, lazy=False, timeline=None) -> None:
        super().__init__(functools.partial(_judge_stage, judge, factory, store), lazy=lazy)
        self.follow(timeline, judges=(judge["name"],))


class ModelsActor(_Timed, stages.Deferred):
    """`caption` (the CaptionActor's arguments, None when captions come from the records), then each judge."""

    metric_stage = "caption_and_judges"

    def __init__(
        self,
        caption: dict | None,
        judges: list[dict],
        factories: dict | None = None,
        store=None,
        lazy=False,
        timeline=None,
    ):
        super().__init__(functools.partial(_models_stage, caption, judges, factories or {}, store), lazy=lazy)
        self.follow(timeline, caption=caption is not None, judges=tuple(j["name"] for j in judges))
