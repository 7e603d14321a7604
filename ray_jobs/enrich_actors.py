"""The enrichment job's model actors: thin Ray shims over `caslie_core.enrichment.stages`.

split pools: a `CaptionActor` pool, then a `JudgeActor` pool per judge; shared (`model_pools: shared`): one
`ModelsActor` pool whose actors run the captioner and every judge in turn on each batch."""

from __future__ import annotations

import functools

from caslie_core.enrichment import stages

from .actors import CaptionCacheClient, actor_id


def _caption_stage(captioner: dict, size: int, cache, wait_s: float, factory):
    from caslie_core.config import CaptionerConfig
    from caslie_core.models.captioner import Captioner

    model = factory() if factory else Captioner.from_config(CaptionerConfig.model_validate(captioner))
    client = CaptionCacheClient(*cache) if cache else None
    return stages.CaptionStage(model, size, client, owner=actor_id(), wait_s=wait_s)


def _models_stage(caption: dict | None, judges: list[dict], factories: dict):
    chain = [_caption_stage(**caption, factory=factories.get("captioner"))] if caption else []
    return stages.Chain(chain + [stages.judge_stage(j, factories.get(j["name"])) for j in judges])


class CaptionActor(stages.Deferred):  # `lazy` on a resume: a finished catalog never loads a model
    def __init__(self, captioner: dict, size: int, cache, wait_s: float, factory=None, lazy=False) -> None:
        super().__init__(functools.partial(_caption_stage, captioner, size, cache, wait_s, factory), lazy=lazy)


class JudgeActor(stages.Deferred):
    def __init__(self, judge: dict, factory=None, lazy=False) -> None:
        super().__init__(functools.partial(stages.judge_stage, judge, factory), lazy=lazy)


class ModelsActor(stages.Deferred):
    """`caption` (the CaptionActor's arguments, None when captions come from the records), then each judge."""

    def __init__(self, caption: dict | None, judges: list[dict], factories: dict | None = None, lazy=False) -> None:
        super().__init__(functools.partial(_models_stage, caption, judges, factories or {}), lazy=lazy)
