"""The item: one record and its images as they move through enrichment, in the batch job and in the service.

`Item` is a record plus per-image state (`ImageSlot`). In the batch job items travel as native Arrow
columns (`ITEM_SCHEMA`): the record's fields as columns, its images as a list of structs. Nothing in
flight is JSON: JSON is written once, at the output boundary, where the MMECInstruct schema has JSON
strings. A stage declares the columns it reads and adds (`Contract`); `Contract.check` fails with the
missing and the present columns, so a stage wired after the wrong one says so at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .models.judge import keep_caption

STATUSES = ("ok", "partial", "failed")
# Where an error happened: a record that failed validation, an image (fetch, decode, caption, judge), a stage
# that raised while handling one row (the stage's name), or output assembly (finalize).
ERROR_STAGES = ("validate", "fetch", "decode", "caption", "judge", "finalize")
MISSING_CAPTION = "NA"  # what the research code judges (and, when kept, writes in) for a missing caption


def error_of(stage: str, message: str, source: str | None = None) -> dict:
    return {"stage": stage, "message": message, "source": source}


@dataclass
class ImageSlot:
    """One image of a record or a request as it moves through the stages."""

    index: int
    url: str
    prompt: str = ""  # the caption request (context-conditioned)
    question: str = ""  # the judge question, `CAPTION_SLOT` where the caption goes (batch job)
    digest: str | None = None  # sha256 of the fetched bytes
    pixels: Any = None  # decoded pixels (in flight only)
    caption: str | None = None
    cached: bool = False  # captioned earlier in the run (same image content and request)
    votes: dict[str, str | None] = field(default_factory=dict)
    vote_errors: dict[str, str] = field(default_factory=dict)
    stored_from: str | None = None  # the run whose caption the result store gave (None: made in this run)
    votes_from: dict[str, str] = field(default_factory=dict)  # judge -> the run whose stored vote this is
    error: dict | None = None  # {stage, message}
    rule: str = "strict"  # the CQE vote rule (`cqe.vote`): how `kept` reads the votes

    @property
    def kept(self) -> bool:
        return keep_caption(self.caption, self.error, list(self.votes.values()), self.rule)

    def outcome(self) -> str:
        """What became of this image, for a count: `kept`, `not_kept`, or `<stage>_failed` (fetch, decode, caption,
        judge)."""
        if self.error:
            return f"{self.error.get('stage', 'unknown')}_failed"
        return "kept" if self.kept else "not_kept"

    def fail(self, stage: str, message: str) -> None:
        if self.error is None:
            self.error = {"stage": stage, "message": message}

    # The caption-and-vote rule, one for the batch job's judge stage and every layout of the service.

    def judged_caption(self, judge_missing: bool = False) -> str | None:
        """The caption the judges are asked about, or None when they are not asked: its caption, when the image did
        not fail; with research judging (`judge_missing`, `cqe.vote: research`) every image's, a missing or empty
        caption as "NA" (the research code's)."""
        if judge_missing:
            return MISSING_CAPTION if self.caption is None or len(self.caption.strip()) < 2 else self.caption
        return self.caption if self.caption is not None and not self.error else None

    def judged(self, judge_missing: bool = False) -> bool:
        """Whether the judges are asked about this image (`judged_caption`); with research judging the "NA" then is
        its caption."""
        caption = self.judged_caption(judge_missing)
        if judge_missing:
            self.caption = caption
        return caption is not None

    def take_vote(self, judge: str, vote: str | None, error: str | None = None) -> None:
        """A judge's answer on this image. A judge that failed on it fails the image (stage `judge`, the error kept
        per judge): an unjudged caption is not kept, and never passes for an abstention."""
        self.votes[judge] = vote
        if error:
            self.vote_errors[judge] = error
            self.fail("judge", f"{judge}: {error}")

    def report(self) -> dict:
        """The per-image result as the service answers it (URLs of data: URIs shortened); `vote_errors`: the judges
        that failed on this image, with their errors."""
        return {
            "index": self.index,
            "url": shown_url(self.url),
            "caption": self.caption,
            "votes": self.votes,
            "vote_errors": self.vote_errors,
            "kept": self.kept,
            "error": self.error,
        }

    def vote_list(self) -> list[dict]:
        """The votes as Arrow carries them: {judge, vote, error, stored_from} in the panel's order."""
        return [
            {"judge": k, "vote": v, "error": self.vote_errors.get(k), "stored_from": self.votes_from.get(k)}
            for k, v in self.votes.items()
        ]

    def result(self) -> dict:
        """The per-image result as the batch job writes it (`image_results`)."""
        return {
            "index": self.index,
            "url": self.url,
            "caption": self.caption,
            "cached": self.cached,
            "stored_from": self.stored_from,
            "votes": self.vote_list(),
            "kept": self.kept,
            "error": None if self.error is None else {"stage": self.error["stage"], "message": self.error["message"]},
        }


def shown_url(url: str) -> str:
    """URLs as echoed in responses: data: URIs are not sent back whole."""
    if url[:5].lower() == "data:":
        return f"{url.partition(',')[0]},... ({len(url)} chars)"
    return url


@dataclass
class Item:
    """One input record in flight: `status` is pending until finalized, or failed (with `error`)."""

    id: str
    task: str | None = None
    split: str | None = None
    status: str = "pending"
    error: dict | None = None  # {stage, message, source}
    raw: str | None = None  # the input row as text, for a row that failed validation
    instruction: str | None = None
    input: Any = None  # dict (single and pair tasks) or list (SR history)
    options: list[str] = field(default_factory=list)
    output: str | None = None
    extra: str | None = None  # the record's other fields, as JSON (written out as they came)
    images: list[ImageSlot] = field(default_factory=list)
    order: int | None = None  # where the record came in the input (`io.folders.input_order`): repeats keep the first

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def fail(self, stage: str, message: str, source: str | None = None) -> None:
        self.status, self.error = "failed", error_of(stage, message, source)


# Arrow types


def _image_fields(*, in_flight: bool) -> list:
    """The fields of an image as it travels (`in_flight`: with its request, question and digest) or as the output
    writes it (`image_results`: with `kept`), in one list so that both change together."""
    import pyarrow as pa

    s = pa.string()
    vote = pa.struct([("judge", s), ("vote", s), ("error", s), ("stored_from", s)])
    request = [("prompt", s), ("question", s), ("digest", s)] if in_flight else []
    return [
        ("index", pa.int32()),
        ("url", s),
        *request,
        ("caption", s),
        ("cached", pa.bool_()),
        ("stored_from", s),  # the run whose stored caption this is (the result store); None: made in this run
        ("votes", pa.list_(vote)),
        *([] if in_flight else [("kept", pa.bool_())]),
        ("error", pa.struct([("stage", s), ("message", s)])),
    ]


def image_type():
    import pyarrow as pa

    return pa.struct(_image_fields(in_flight=True))


def result_type():
    """`image_results` of the output: what each image became."""
    import pyarrow as pa

    return pa.struct(_image_fields(in_flight=False))


def record_error_type():
    import pyarrow as pa

    return pa.struct([("stage", pa.string()), ("message", pa.string()), ("source", pa.string())])


def input_type():
    """A record's input without JSON: its entries in order (`key` null for SR's history list); a value
    that is not a string is kept as JSON text with `json` true."""
    import pyarrow as pa

    return pa.list_(pa.struct([("key", pa.string()), ("value", pa.string()), ("json", pa.bool_())]))


def item_schema():
    import pyarrow as pa

    s = pa.string()
    return pa.schema(
        [
            ("id", s),
            ("task", s),
            ("split", s),
            ("status", s),
            ("error", record_error_type()),
            ("raw", s),
            ("instruction", s),
            ("input", input_type()),
            ("options", pa.list_(s)),
            ("output", s),
            ("extra", s),
            ("images", pa.list_(image_type())),
            ("order", pa.int64()),
        ]
    )


ITEM_COLUMNS = (
    "id",
    "task",
    "split",
    "status",
    "error",
    "raw",
    "instruction",
    "input",
    "options",
    "output",
    "extra",
    "images",
    "order",
)
PIXELS = "pixels"  # list<binary>: decoded pixels per image, between decode and caption


def input_to_arrow(value: Any) -> list[dict] | None:
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    return [
        {"key": k, "value": v, "json": False}
        if isinstance(v, str)
        else {"key": k, "value": json.dumps(v, ensure_ascii=False), "json": True}
        for k, v in pairs
    ]


def input_from_arrow(entries: list[dict] | None, *, as_list: bool) -> Any:
    if entries is None:
        return None
    values = [(e["key"], json.loads(e["value"]) if e["json"] else e["value"]) for e in entries]
    return [v for _, v in values] if as_list else dict(values)


def image_to_arrow(s: ImageSlot) -> dict:
    return {
        "index": s.index,
        "url": s.url,
        "prompt": s.prompt,
        "question": s.question,
        "digest": s.digest,
        "caption": s.caption,
        "cached": s.cached,
        "stored_from": s.stored_from,
        "votes": s.vote_list(),
        "error": s.error,
    }


def image_from_arrow(d: dict) -> ImageSlot:
    votes = d.get("votes") or []
    return ImageSlot(
        index=d["index"],
        url=d["url"],
        prompt=d.get("prompt") or "",
        question=d.get("question") or "",
        digest=d.get("digest"),
        caption=d.get("caption"),
        cached=bool(d.get("cached")),
        votes={v["judge"]: v["vote"] for v in votes},
        vote_errors={v["judge"]: v["error"] for v in votes if v["error"]},
        stored_from=d.get("stored_from"),
        votes_from={v["judge"]: v["stored_from"] for v in votes if v.get("stored_from")},
        error=d.get("error"),
    )


def images_to_column(images: list[list[ImageSlot]]):
    import pyarrow as pa

    return pa.array([[image_to_arrow(s) for s in row] for row in images], type=pa.list_(image_type()))


def images_from_column(column) -> list[list[ImageSlot]]:
    return [[image_from_arrow(d) for d in row or []] for row in column.to_pylist()]


def items_to_table(items: list[Item], *, pixels: bool = False):
    """Items as Arrow (`ITEM_SCHEMA`, plus the `pixels` column when asked)."""
    import pyarrow as pa

    schema = item_schema()
    cols: dict[str, list] = {c: [] for c in ITEM_COLUMNS}
    for it in items:
        cols["id"].append(it.id)
        cols["task"].append(it.task)
        cols["split"].append(it.split)
        cols["status"].append(it.status)
        cols["error"].append(it.error)
        cols["raw"].append(it.raw)
        cols["instruction"].append(it.instruction)
        cols["input"].append(input_to_arrow(it.input))
        cols["options"].append(it.options)
        cols["output"].append(it.output)
        cols["extra"].append(it.extra)
        cols["images"].append([image_to_arrow(s) for s in it.images])
        cols["order"].append(it.order)
    arrays = [pa.array(cols[c], type=schema.field(c).type) for c in ITEM_COLUMNS]
    table = pa.Table.from_arrays(arrays, schema=schema)
    if pixels:
        px = [[s.pixels for s in it.images] for it in items]
        table = table.append_column(PIXELS, pa.array(px, type=pa.list_(pa.binary())))
    return table


def items_from_table(table) -> list[Item]:
    """Arrow rows back to items (pixels, when present, restored on the slots)."""
    from .tasks import get_task

    items = []
    pixels = table.column(PIXELS).to_pylist() if PIXELS in table.column_names else None
    for r, row in enumerate(table.select(list(ITEM_COLUMNS)).to_pylist()):
        images = [image_from_arrow(d) for d in row["images"] or []]
        if pixels is not None:
            for s, px in zip(images, pixels[r] or []):
                s.pixels = px
        as_list = False
        if row["input"] is not None:
            as_list = get_task(row["task"]).layout == "sequence"
        items.append(
            Item(
                id=row["id"],
                task=row["task"],
                split=row["split"],
                status=row["status"],
                error=row["error"],
                raw=row["raw"],
                instruction=row["instruction"],
                input=input_from_arrow(row["input"], as_list=as_list),
                options=row["options"] or [],
                output=row["output"],
                extra=row["extra"],
                images=images,
                order=row["order"],
            )
        )
    return items


@dataclass(frozen=True)
class Contract:
    """The columns a stage reads and adds (and drops): checked on every batch it gets."""

    stage: str
    reads: tuple[str, ...]
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    def check(self, table) -> None:
        present = list(table.column_names)
        missing = [c for c in self.reads if c not in present]
        if missing:
            raise ContractError(
                f"stage {self.stage!r} reads columns {missing} that its input lacks; present: {present} "
                f"(a stage is wired before the one that adds them)"
            )


class ContractError(RuntimeError):
    """A stage got a batch without the columns it reads: a wiring bug, not a data problem."""
