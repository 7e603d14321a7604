"""The enrichment stages over Arrow batches of items (`caslie_core.items`; no Ray here).

One row per record, its images a list of structs, so no regrouping (shuffle) is ever needed: the
pipeline streams end to end. Each stage has a `Contract` (the columns it reads, adds and drops),
checked on every batch. Failures are data: an image that cannot be fetched, decoded, captioned or
judged carries `{stage, message}`; an exception while handling one row fails that row (its `error`
names the stage) and the batch goes on; only a model that fails every item of `FailureStreak.limit`
batches in a row stops the job (`EngineError`: the model or its device is broken, not the data).

    prepare       reads raw rows (text | record columns)  adds the item columns and pixels (`parse`, then fetch)
    CaptionStage  reads status, images, pixels            fills captions; drops pixels
    JudgeStage    reads status, images                    adds its votes
    finalize      reads the item columns                  returns output rows (`io.store.output_schema`)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import EngineError, ImageError  # noqa: F401 - EngineError: what stages raise
from ..images import FetchPolicy, decode_image, digest, fetch_image
from ..io.store import OUTPUT_COLUMNS
from ..items import (  # noqa: F401 - STATUSES, ERROR_STAGES: the row contract, named here too
    ERROR_STAGES,
    ITEM_COLUMNS,
    PIXELS,
    STATUSES,
    Contract,
    ImageSlot,
    Item,
    images_from_column,
    images_to_column,
    items_from_table,
    items_to_table,
)
from ..models.batching import ModelCalls, error_text
from ..models.captioner import CaptionModel, CaptionResult
from ..models.judge import Vote, VoteModel
from ..prompts import fill_caption
from .assemble import assemble
from .cache import CaptionCache, caption_key
from .parse import parse_items
from .stored import Lookup, ResultWriter, StoreUse, look_up

log = logging.getLogger("caslie")
CAPTION = Contract("caption", reads=("status", "images", PIXELS), drops=(PIXELS,))
FINALIZE = Contract("finalize", reads=ITEM_COLUMNS)


def judge_contract(name: str) -> Contract:
    return Contract(f"judge {name}", reads=("status", "images"))


# prepare: parse, skip finished records, fetch, decode


def fetch_decode(items: list[Item], policy: FetchPolicy, *, threads: int, max_pixels: int, size: int) -> None:
    """Fetch and decode every image of every pending item (at most `threads` at once); a failure lands on
    its image. An empty or undecodable body is a decode error."""
    slots = [s for it in items if it.pending for s in it.images]

    def one(slot: ImageSlot) -> None:
        try:
            data = fetch_image(slot.url, policy)
        except ImageError as e:
            return slot.fail(e.stage, e.reason)
        except Exception as e:
            return slot.fail("fetch", error_text(e))
        slot.digest = digest(data)
        try:
            slot.pixels = decode_image(data, max_pixels=max_pixels, size=size).tobytes()
        except ImageError as e:
            slot.fail(e.stage, e.reason)
        except Exception as e:
            slot.fail("decode", error_text(e))

    if len(slots) == 1:
        one(slots[0])
    elif slots:
        with ThreadPoolExecutor(max_workers=min(threads, len(slots))) as pool:
            list(pool.map(one, slots))


def prepare(
    rows: list[dict],
    *,
    policy: FetchPolicy,
    threads: int,
    max_pixels: int,
    size: int,
    done: Callable[[str], bool] | None = None,
    captions_from_record: bool = False,
    store: StoreUse | None = None,
    lookup: Lookup | None = None,
):
    """Raw rows -> an Arrow batch of items with decoded pixels (the CPU stages, fused in one task). With
    `captions_from_record` each image's caption comes from the record's `caption_info`: nothing is fetched.
    With a `store` that reads (`lookup`), stored captions and votes fill their slots (`stored.look_up`)."""
    items = parse_items(rows, done=done, captions_from_record=captions_from_record)
    if not captions_from_record:
        fetch_decode(items, policy, threads=threads, max_pixels=max_pixels, size=size)
    if store is not None and store.reads and lookup is not None:
        try:
            look_up(items, store, lookup)
        except Exception as e:  # noqa: BLE001 - the store is a cache: what it did not fill is computed
            log.warning(f"[store] lookup of a batch failed ({error_text(e)}); its results are computed")
    return items_to_table(items, pixels=not captions_from_record)


# model stages


class Deferred:
    """A model stage built by `make()` now, or (`lazy`) when the first non-empty batch arrives; empty batches
    pass through untouched. A resumed run is lazy: resuming a finished catalog loads no model at all."""

    def __init__(self, make: Callable[[], Callable], *, lazy: bool = False) -> None:
        self._make, self.stage = make, None if lazy else make()

    def __call__(self, batch):
        if batch.num_rows == 0:
            return batch
        if self.stage is None:
            self.stage = self._make()
        return self.stage(batch)


class Chain:
    """Model stages run in turn on each batch in one process (`model_pools: shared`): the captioner and every
    judge in one actor, as the batched loop runs them, with no hop between pools."""

    def __init__(self, stages: list[Callable]) -> None:
        self.stages = stages

    def __call__(self, table):
        for stage in self.stages:
            table = stage(table)
        return table


def take_fallbacks(stage) -> dict[str, tuple[int, bool]]:
    """{model: (its batches redone item by item since the last take, whether it now runs at batch size 1)} for
    the models of a model stage (a Chain's too); models without counts (test fakes) and quiet ones are left out."""
    out = {}
    for s in stage.stages if isinstance(stage, Chain) else [stage]:
        counts = getattr(getattr(s, "captioner", None) or getattr(s, "judge", None), "fallbacks", None)
        if counts is not None and ((n := counts.take()) or counts.single_only):
            out[counts.model] = (n, counts.single_only)
    return out


def _fail_rows(table, failures: dict[int, dict]):
    """Mark rows failed (`failures`: position -> error) in an Arrow batch."""
    import pyarrow as pa

    from ..items import record_error_type

    if not failures:
        return table
    status = table.column("status").to_pylist()
    errors = table.column("error").to_pylist()
    for r, err in failures.items():
        status[r], errors[r] = "failed", {**err, "source": None}
    table = table.set_column(table.column_names.index("status"), "status", pa.array(status, pa.string()))
    return table.set_column(table.column_names.index("error"), "error", pa.array(errors, record_error_type()))


def _with_images(table, images: list[list[ImageSlot]]):
    return table.set_column(table.column_names.index("images"), "images", images_to_column(images))


@dataclass
class CaptionStage:
    """Captions every decoded image of each pending row; identical (image, request) pairs once (`cache`)."""

    captioner: CaptionModel  # models.captioner.Captioner, or anything with .caption(images, prompts)
    size: int
    cache: CaptionCache | None = None
    owner: str = "local"
    wait_s: float = 600.0
    poll_s: float = 0.05
    calls: ModelCalls = field(default_factory=lambda: ModelCalls("the captioner"))
    results: ResultWriter | None = None  # new captions into the result store

    def __call__(self, table):
        import numpy as np

        CAPTION.check(table)
        status = table.column("status").to_pylist()
        images = images_from_column(table.column("images"))
        pixels = table.column(PIXELS).to_pylist()
        work: dict[str, tuple[Any, str, str]] = {}  # key -> (pixels, prompt, digest)
        slots: list[tuple[ImageSlot, str]] = []
        failures: dict[int, dict] = {}
        for r, row in enumerate(images):
            if status[r] != "pending":
                continue
            try:
                mine = []
                for s in row:
                    if s.error is not None or s.stored_from is not None:  # failed, or the store's caption
                        continue
                    key = caption_key(s.digest or "", s.prompt)
                    if key not in work:
                        arr = np.frombuffer(pixels[r][s.index], dtype=np.uint8).reshape(self.size, self.size, 3)
                        work[key] = (arr, s.prompt, s.digest or "")
                    mine.append((s, key))
                slots.extend(mine)
            except Exception as e:
                failures[r] = {"stage": "caption", "message": error_text(e)}
        results = self._caption(work)
        for s, key in slots:
            cap, err, cached = results[key]
            s.caption, s.cached = cap, cached
            if err is not None:
                s.fail("caption", err)
        return _fail_rows(_with_images(table.drop_columns([PIXELS]), images), failures)

    def _caption(self, work: dict[str, tuple[Any, str, str]]) -> dict[str, tuple[str | None, str | None, bool]]:
        results: dict[str, tuple[str | None, str | None, bool]] = {}
        pending = list(work)
        deadline = time.monotonic() + self.wait_s
        while pending:
            if self.cache is None or time.monotonic() > deadline:  # no cache, or the claimant went silent
                status = {k: ("mine", None) for k in pending}
            else:
                status = self.cache.claim(pending, self.owner)
            for k in pending:
                if status[k][0] == "hit":
                    results[k] = (status[k][1], None, True)
            mine = [k for k in pending if status[k][0] == "mine"]
            outs = self.calls(
                mine,
                lambda keys: self.captioner.caption([work[k][0] for k in keys], [work[k][1] for k in keys]),
                lambda e: CaptionResult(None, error=error_text(e)),
                lambda outs: [o.error for o in outs],
                getattr(self.captioner, "fallbacks", None),
            )
            for k, res in zip(mine, outs):
                results[k] = (res.caption, res.error, False)
            if self.results is not None:  # made here and not failed: what the store keeps
                self.results.captions([(work[k][2], work[k][1], results[k][0]) for k in mine if results[k][1] is None])
            if self.cache is not None and mine:
                self.cache.put({k: results[k][0] for k in mine if results[k][1] is None}, self.owner)
                failed = [k for k in mine if results[k][1] is not None]  # not cached: another actor may retry
                if failed:
                    self.cache.release(failed, self.owner)
            pending = [k for k in pending if k not in results]
            if pending:
                time.sleep(self.poll_s)
        return results


@dataclass
class JudgeStage:
    """One judge's vote on every caption of each pending row. A judge that fails on an image is that
    image's error (stage `judge`): an unjudged caption is not kept, and never passes for an abstention."""

    judge: VoteModel  # models.judge.Judge, or anything with .vote(questions)
    name: str
    calls: ModelCalls | None = None
    judge_missing: bool = False  # the research CQE: an image without a caption (failed, empty) is judged as "NA"
    results: ResultWriter | None = None  # new votes into the result store

    def __post_init__(self) -> None:
        self.contract = judge_contract(self.name)
        if self.calls is None:
            self.calls = ModelCalls(f"judge {self.name!r}")

    def __call__(self, table):
        self.contract.check(table)
        status = table.column("status").to_pylist()
        images = images_from_column(table.column("images"))
        questions: list[str] = []
        slots: list[ImageSlot] = []
        failures: dict[int, dict] = {}
        for r, row in enumerate(images):
            if status[r] != "pending":
                continue
            try:
                judged = [s for s in row if s.judged(self.judge_missing)]  # research: a missing caption is "NA"
                fresh = [s for s in row if self.name not in s.votes_from]  # not the store's vote already
                asked = [(s, fill_caption(s.question, s.caption)) for s in judged if self.name not in s.votes_from]
                for s in fresh:
                    s.votes[self.name] = None
                questions.extend(q for _, q in asked)
                slots.extend(s for s, _ in asked)
            except Exception as e:
                failures[r] = {"stage": "judge", "message": error_text(e)}
        votes = self.calls(
            questions,
            self.judge.vote,
            lambda e: Vote(None, None, error_text(e)),
            lambda vs: [v.error for v in vs],
            getattr(self.judge, "fallbacks", None),
        )
        for s, v in zip(slots, votes):
            s.take_vote(self.name, v.vote, v.error)
        if self.results is not None:
            self.results.votes(self.name, [(q, v) for q, v in zip(questions, votes) if v.error is None])
        return _fail_rows(_with_images(table, images), failures)


# finalize: output rows


def finalize(table, *, provenance: dict) -> list[dict]:
    """One output row per item: status, per-image results, the enriched input, provenance."""
    FINALIZE.check(table)
    keys = (
        "captioner_model",
        "captioner_revision",
        "captioner_engine",
        "judges",
        "prompt_version",
        "config_hash",
        "run_id",
    )
    prov = {k: provenance.get(k) for k in keys}
    rule = provenance.get("cqe_vote") or "strict"
    out = []
    for item in items_from_table(table):
        for s in item.images:
            s.rule = rule
        base = dict.fromkeys(OUTPUT_COLUMNS) | {"id": item.id, "task": item.task, "split": item.split, **prov}
        base["input_order"] = item.order
        try:
            out.append(base | _finalize_one(item))
        except Exception as e:  # a bug must not lose the record
            item.fail("finalize", error_text(e))
            out.append(base | _failed(item))
    return out


def _failed(item: Item) -> dict:
    return {
        "status": "failed",
        "error": item.error,
        "raw": item.raw,
        "n_images": len(item.images),
        "n_failed_images": 0,
        "n_kept": 0,
        "image_results": [],
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _finalize_one(item: Item) -> dict:
    if item.status == "failed":
        return _failed(item)
    from ..records import Record

    rec = Record(
        item.id, item.task or "", item.instruction or "", item.input, item.options, [s.url for s in item.images]
    )
    kept = [s.kept for s in item.images]
    enriched = assemble(rec, [s.caption for s in item.images], kept)
    failed = [s for s in item.images if s.error is not None]
    error = None
    if failed:
        first = failed[0].error
        more = f"{len(failed)} of {len(item.images)} image(s) failed; first: " if len(item.images) > 1 else ""
        error = {"stage": first["stage"], "message": more + first["message"], "source": None}
    return {
        "status": "partial" if failed else "ok",
        "error": error,
        "instruction": item.instruction,
        "input": _dumps(enriched.input),
        "options": _dumps(enriched.options),
        "output": item.output,
        "images": _dumps(rec.images),
        "original_input": _dumps(item.input),
        "original_options": _dumps(item.options),
        "n_images": len(item.images),
        "n_failed_images": len(failed),
        "n_kept": sum(kept),
        "image_results": [s.result() for s in item.images],
        "extra": item.extra,
        "raw": None,
    }
