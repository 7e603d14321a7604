"""Raw rows -> items: read each JSON line or record, skip what a resumed run already finished, validate.

A row that cannot be read or validated, whatever the reason (bad JSON, a wrong field, nesting too deep to
serialise), becomes a failed item with stage `validate`: it is accounted for in the output, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import RecordError
from ..images import digest
from ..io.folders import ORDER
from ..items import ImageSlot, Item, input_to_arrow
from ..models.batching import error_text
from ..prompts import caption_request, judge_template
from ..records import Reject, caption_list, parse_record, raw_id


def parse_items(
    rows: Iterable[dict],
    *,
    source: str | None = None,
    done: Callable[[str], bool] | None = None,
    captions_from_record: bool = False,
):
    """Raw rows (`{"text": <JSON line>}` or a record dict) -> items; rows whose id `done` says is finished
    are skipped (looked up before validation when the row names its id, all of a batch's at once when `done`
    has `many(ids)`, as `DoneIds` has). A row that cannot be read or validated, whatever the reason (bad
    JSON, a wrong field, nesting too deep to serialise), is a failed item."""
    loaded = []  # (row, source, the parsed record or None, the row's failed item or None)
    orders = []
    for row in rows:
        if ORDER in row:  # the row's place in the input, not a field of the record
            row = dict(row)
            orders.append(row.pop(ORDER))
        else:
            orders.append(None)
        src = row.get("path") or source
        try:
            raw, bad = _load(row, src)
        except Exception as e:
            raw, bad = None, _unreadable(row, e, src)
        loaded.append((row, src, raw, bad))
    given = [_given_id(raw) if done and bad is None else None for _, _, raw, bad in loaded]
    finished = _finished(done, given) if done else {}
    out: list[Item] = []
    for (row, src, raw, bad), rid, order in zip(loaded, given, orders):
        if rid is not None and finished[rid]:
            continue
        item = bad
        if item is None:
            try:
                item = _build(raw, src, captions_from_record)
            except Exception as e:
                item = _unreadable(row, e, src)
        if not (done and item.id != rid and done(item.id)):
            item.order = order
            out.append(item)
    return out


def _given_id(raw: Any) -> str | None:
    given = raw.get("id") if isinstance(raw, dict) else None
    return None if given in (None, "") else str(given)


def _finished(done, ids: list[str | None]) -> dict[str, bool]:
    todo = list(dict.fromkeys(i for i in ids if i is not None))
    many = getattr(done, "many", None)
    return dict(zip(todo, many(todo) if many else map(done, todo)))


def _unreadable(row: dict, e: Exception, src: str | None) -> Item:
    item = Item(_fallback_id(row), raw=_text(row.get("text", row)))
    item.fail("validate", error_text(e), src)
    return item


def _load(row: dict, src: str | None) -> tuple[Any, Item | None]:
    """(the record as parsed JSON or the row itself, None) or (None, the row's failed item)."""
    if set(row) <= {"text", "path"} and "text" in row:
        try:
            return json.loads(row["text"]), None
        except json.JSONDecodeError as e:
            item = Item(raw_id(row["text"]), raw=row["text"])
            item.fail("validate", f"malformed JSON line ({e.msg} at char {e.pos})", src)
            return None, item
    return row, None


def _build(raw: Any, src: str | None, captions_from_record: bool = False) -> Item:
    try:
        rec = parse_record(raw, source=src)
        item = _item(rec)
        if captions_from_record:
            _record_captions(item, rec.extra.get("caption_info"))
        input_to_arrow(item.input)  # what cannot be carried (too deep to serialise) fails here, on this row
    except RecordError as e:
        rej = Reject.from_error(e, raw)
        field_ = f" field '{rej.field}'" if rej.field else ""
        item = Item(rej.id, task=rej.task, split=rej.split, raw=_text(raw))
        item.fail("validate", f"{rej.reason}{field_}", rej.source)
    return item


def _fallback_id(row: dict) -> str:
    try:
        return raw_id(row.get("text", row))
    except Exception:  # unhashable content: a stable id from what can be read
        return "raw-" + digest(f"{sorted(map(str, row))}|{row.get('id')}".encode())[:16]


def _text(raw: Any) -> str:
    try:
        return raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    except Exception as e:
        return f"<not printable: {error_text(e)}>"


def _item(rec) -> Item:
    item = Item(
        rec.id,
        task=rec.task,
        split=rec.split,
        instruction=rec.instruction,
        input=rec.input,
        options=list(rec.options),
        output=rec.output,
        extra=json.dumps(rec.extra, ensure_ascii=False, default=str) if rec.extra else None,
    )
    try:  # each image's caption request and judge question, built once
        item.images = [
            ImageSlot(i, url, caption_request(rec, i), judge_template(rec, i)) for i, url in enumerate(rec.images)
        ]
    except Exception as e:
        item.images = [ImageSlot(i, url) for i, url in enumerate(rec.images)]
        item.fail("validate", f"cannot build the caption request: {error_text(e)}")
    return item


def _record_captions(item: Item, info: Any) -> None:
    """Each image's caption from the record's `caption_info`; an image without one fails at stage `caption`."""
    try:
        captions = caption_list(info)
    except ValueError as e:
        captions, why = None, str(e)
    else:
        why = "the record has no caption_info"
    if captions is None:
        for s in item.images:
            s.fail("caption", f"captioner.source is record, but {why}")
        return
    for s in item.images:
        c = captions[s.index] if s.index < len(captions) else None
        if c is None:
            s.fail(
                "caption", f"caption_info has no caption for image {s.index} ({len(captions)} for {len(item.images)})"
            )
        else:
            s.caption = c
