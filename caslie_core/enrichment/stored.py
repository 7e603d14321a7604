"""The result store (`caslie_core.io.results`) in the enrichment stages: stored captions and votes are looked up
where an image's content is first known (`prepare`, right after the fetch), so the model pools get only what is
new; the model stages store what they compute, a part per batch (merged when the run ends).

A caption is looked up by (image digest, caption request, captioner identity), a vote by (the judge question with
the caption in it, judge identity): a caption found in the store has its votes looked up at once; a caption made
in this run is judged. A slot filled from the store says so (`stored_from`: the run that computed it; a vote's
in `votes_from`), and its pixels are dropped there: they never travel to the captioner.

The models load on their first miss (`OnFirstCall`): a rerun in which nothing is new loads no model. A store that
cannot be read or written costs recomputation, never a record: lookups that fail are misses, writes that fail are
counted and said once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..io.results import CAPTIONS, VOTES, ResultStore, caption_model, judge_model, result_key
from ..items import ImageSlot, Item
from ..prompts import fill_caption

log = logging.getLogger("caslie")


class Lookup(Protocol):
    def get(self, kind: str, keys: list[str]) -> dict[str, tuple]: ...  # {key: (value, raw, run_id)}


@dataclass(frozen=True)
class StoreUse:
    """What a run reads from and writes to the store: the models' identities (plain strings, sent to every task
    and actor), the store's path and this run's id."""

    path: str
    run_id: str
    reads: bool
    writes: bool
    captioner: str | None  # the captioner's identity; None: captions come from the records (only votes stored)
    judges: dict[str, str] = field(default_factory=dict)  # judge name -> identity, in the panel's order
    judge_missing: dict[str, bool] = field(default_factory=dict)  # research judging: a missing caption is "NA"

    @classmethod
    def of(cls, cfg, run_id: str) -> StoreUse | None:
        """The use an `EnrichConfig` asks for, or None when the store is off."""
        s = cfg.store
        if not (s.reads or s.writes):
            return None
        captioner = caption_model(cfg.captioner, cfg.decode.image_size) if cfg.captioner.source == "model" else None
        return cls(
            path=s.path,
            run_id=run_id,
            reads=s.reads,
            writes=s.writes,
            captioner=captioner,
            judges={j.name: judge_model(j) for j in cfg.judges},
            judge_missing={j.name: j.reply == "research" for j in cfg.judges},
        )

    def models(self) -> dict[str, set[str]]:
        """{kind: identities} a lookup loads."""
        return {CAPTIONS: {self.captioner} if self.captioner else set(), VOTES: set(self.judges.values())}


def question(slot: ImageSlot, judge_missing: bool) -> str | None:
    """The judge question about `slot` with its caption in it, or None when the image is not judged
    (`ImageSlot.judged_caption`: the slot is left as it is)."""
    caption = slot.judged_caption(judge_missing)
    return None if caption is None else fill_caption(slot.question, caption)


def look_up(items: list[Item], use: StoreUse, lookup: Lookup) -> None:
    """Fill the pending items' slots from the store: captions, then the votes on every caption already known
    (found now, or from the records). A lookup that fails is a miss."""
    slots = [s for it in items if it.pending for s in it.images if s.error is None]
    known = slots
    if use.captioner:
        wanted: dict[str, list[ImageSlot]] = {}
        for s in slots:
            if s.digest:
                wanted.setdefault(result_key(use.captioner, s.digest, s.prompt), []).append(s)
        for key, (value, _, run) in _get(lookup, CAPTIONS, list(wanted)).items():
            for s in wanted[key]:
                s.caption, s.stored_from, s.pixels = value, run, None
        known = [s for s in slots if s.stored_from is not None]
    asked: dict[str, list[tuple[ImageSlot, str]]] = {}
    for s in known:
        for name, model in use.judges.items():
            q = question(s, use.judge_missing.get(name, False))
            if q is not None:
                asked.setdefault(result_key(model, q), []).append((s, name))
    for key, (value, _, run) in _get(lookup, VOTES, list(asked)).items():
        for s, name in asked[key]:
            if not s.votes:
                s.votes = dict.fromkeys(use.judges)  # the panel's order, whichever votes are found
            s.votes[name], s.votes_from[name] = value, run


def _get(lookup: Lookup, kind: str, keys: list[str]) -> dict[str, tuple]:
    if not keys:
        return {}
    try:
        return lookup.get(kind, keys)
    except Exception as e:  # noqa: BLE001 - the store is a cache: a failed lookup is a miss
        log.warning(f"[store] {kind} lookup failed ({type(e).__name__}: {e}); computing them")
        return {}


class ResultWriter:
    """A model stage's new results into the store, one part per batch. A write that fails is counted and said
    once; the records go on."""

    def __init__(self, use: StoreUse) -> None:
        self.use, self.store, self.failed, self.written = use, ResultStore(use.path), 0, 0

    def _write(self, kind: str, rows: list[dict]) -> None:
        if not rows:
            return
        try:
            self.store.write(kind, rows, self.use.run_id)
            self.written += len(rows)
        except Exception as e:  # noqa: BLE001 - a cache write: the results are in the output anyway
            self.failed += 1
            if self.failed == 1:
                log.warning(f"[store] cannot write {kind} to {self.use.path} ({type(e).__name__}: {e})")

    def captions(self, made: list[tuple[str, str, str | None]]) -> None:
        """(image digest, caption request, caption) of captions made in this batch."""
        model = self.use.captioner
        if model:
            self._write(CAPTIONS, [{"key": result_key(model, d, p), "value": c, "model": model} for d, p, c in made])

    def votes(self, judge: str, made: list[tuple[str, Any]]) -> None:
        """(judge question with the caption in it, `Vote`) of votes made in this batch (not failed ones)."""
        model = self.use.judges[judge]
        rows = [{"key": result_key(model, q), "value": v.vote, "raw": v.raw, "model": model} for q, v in made]
        self._write(VOTES, rows)


class OnFirstCall:
    """A model built by `make()` when first called (`caption`, `vote`): a stage whose batches the store fills
    entirely never loads its model. Attributes (`fallbacks`) are the model's once it exists."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make, self._model = make, None

    def _built(self):
        if self._model is None:
            self._model = self._make()
        return self._model

    def caption(self, *args, **kw):
        return self._built().caption(*args, **kw)

    def vote(self, *args, **kw):
        return self._built().vote(*args, **kw)

    def __getattr__(self, name: str):
        if name.startswith("_") or self._model is None:
            raise AttributeError(name)
        return getattr(self._model, name)
