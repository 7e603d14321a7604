"""The enrichment job's model actors: thin Ray shims over `caslie_core.enrichment.stages`.

split pools: a `CaptionActor` pool, then a `JudgeActor` pool per judge; shared (`model_pools: shared`): one
`ModelsActor` pool whose actors run the captioner and every judge in turn on each batch."""

from __future__ import annotations

import functools
import time

from caslie_core.enrichment import stages

from . import metrics
from .actors import CaptionCacheClient, actor_id
from .timeline import TimelineClient


class _Timed:
    """Each batch's seconds into `caslie_enrich_stage_seconds{stage}`, its models' batches redone item by item
    into `caslie_batch_fallbacks_total{model}`; each batch done told to the job's timeline (`timeline`: the named
    actor and this pool's config key), with those fallbacks (the job's summary counts them)."""

    metric_stage = "model"
    timeline: TimelineClient | None = None

    def __call__(self, batch):
        t = time.perf_counter()
        try:
            out = super().__call__(batch)
        finally:
            metrics.observe("caslie_enrich_stage_seconds", time.perf_counter() - t, stage=self.metric_stage)
        fallbacks = stages.take_fallbacks(self.stage)
        for model, (n, _) in fallbacks.items():
            metrics.inc("caslie_batch_fallbacks_total", n, model=model)
        if self.timeline is not None and batch.num_rows:
            self.timeline.batch(batch.num_rows, fallbacks)
        return out

    def follow(self, timeline) -> None:
        self.timeline = TimelineClient(tuple(timeline[0]), timeline[1]) if timeline else None

    def __del__(self) -> None:  # Ray Data retires the actor: its last batches reach the timeline
        if self.timeline is not None:
            self.timeline.flush(wait_s=2.0)


def _caption_stage(captioner: dict, size: int, cache, wait_s: float, factory):
    from caslie_core.config import CaptionerConfig
    from caslie_core.models.captioner import Captioner

    model = factory() if factory else Captioner.from_config(CaptionerConfig.model_validate(captioner))
    client = CaptionCacheClient(*cache) if cache else None
    return stages.CaptionStage(model, size, client, owner=actor_id(), wait_s=wait_s)


def _models_stage(caption: dict | None, judges: list[dict], factories: dict):
    chain = [_caption_stage(**caption, factory=factories.get("captioner"))] if caption else []
    return stages.Chain(chain + [stages.judge_stage(j, factories.get(j["name"])) for j in judges])


class CaptionActor(_Timed, stages.Deferred):  # `lazy` on a resume: a finished catalog never loads a model
    metric_stage = "caption"

    def __init__(self, captioner: dict, size: int, cache, wait_s: float, factory=None, lazy=False, timeline=None):
        super().__init__(functools.partial(_caption_stage, captioner, size, cache, wait_s, factory), lazy=lazy)
        self.follow(timeline)


class JudgeActor(_Timed, stages.Deferred):
    metric_stage = "judge"

    def __init__(self, judge: dict, factory=None, lazy=False, timeline=None) -> None:
        super().__init__(functools.partial(stages.judge_stage, judge, factory), lazy=lazy)
        self.follow(timeline)


class ModelsActor(_Timed, stages.Deferred):
    """`caption` (the CaptionActor's arguments, None when captions come from the records), then each judge."""

    metric_stage = "caption_and_judges"

    def __init__(
        self, caption: dict | None, judges: list[dict], factories: dict | None = None, lazy=False, timeline=None
    ):
        super().__init__(functools.partial(_models_stage, caption, judges, factories or {}), lazy=lazy)
        self.follow(timeline)
