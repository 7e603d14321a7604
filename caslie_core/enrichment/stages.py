"""The enrichment stages as plain Python over lists of row dicts (no Ray here).

Rows are one per record and carry its images as lists, so no regrouping (shuffle) is ever needed:
the pipeline streams end to end. Each stage declares the columns it reads and adds. Per-image
failures are data: they are recorded on the row with the stage and the cause, never raised.

    parse_rows    reads RAW (text | raw dict)   adds PARSED
    fetch_rows    reads PARSED                  adds image_bytes, image_errors, image_digests
    decode_rows   reads image_bytes             adds pixels, drops image_bytes
    CaptionStage  reads record, pixels          adds captions, caption_cached; drops pixels
    JudgeStage    reads record, captions        adds votes_<name>
    finalize_rows reads all of the above        returns OUTPUT rows (one per input record)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import ImageError, RecordError
from ..images import FetchPolicy, decode_image, digest, fetch_image
from ..io.store import OUTPUT_COLUMNS
from ..models.captioner import CaptionModel
from ..models.judge import VoteModel, keep_caption
from ..prompts import caption_request, judge_question
from ..records import Record, Reject, parse_record, raw_id
from .assemble import assemble
from .cache import CaptionCache, caption_key

PARSED = ("id", "task", "split", "status", "error", "record", "raw", "n_images")
FETCH_ADDS = ("image_bytes", "image_errors", "image_digests")
DECODE_ADDS = ("pixels",)
CAPTION_ADDS = ("captions", "caption_cached")
STATUSES = ("ok", "partial", "failed")
ERROR_STAGES = ("validate", "fetch", "decode", "caption", "judge", "internal")


def _load(row: dict) -> Record:
    d = json.loads(row["record"])
    return Record(**d)


def parse_rows(rows: Iterable[dict], *, source: str | None = None) -> list[dict]:
    """Validate raw rows. A row is `{"text": <JSON line>}` or a raw record dict (Parquet)."""
    out = []
    for row in rows:
        raw: Any = row
        if set(row) <= {"text", "path"} and "text" in row:
            try:
                raw = json.loads(row["text"])
            except json.JSONDecodeError as e:
                rid = raw_id(row["text"])
                out.append(
                    _failed_parse(
                        rid,
                        None,
                        None,
                        f"malformed JSON line ({e.msg} at char {e.pos})",
                        row["text"],
                        source=row.get("path") or source,
                    )
                )
                continue
        try:
            rec = parse_record(raw, source=row.get("path") or source)
        except RecordError as e:
            rej = Reject.from_error(e, raw)
            field = f" field '{rej.field}'" if rej.field else ""
            out.append(_failed_parse(rej.id, rej.task, rej.split, f"{rej.reason}{field}", raw, source=rej.source))
            continue
        out.append(
            {
                "id": rec.id,
                "task": rec.task,
                "split": rec.split or "",
                "status": "pending",
                "error": "",
                "record": json.dumps(rec.as_dict(), ensure_ascii=False, default=str),
                "raw": "",
                "n_images": len(rec.images),
            }
        )
    return out


def _failed_parse(rid, task, split, reason, raw, *, source=None) -> dict:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return {
        "id": rid,
        "task": str(task or ""),
        "split": str(split or ""),
        "status": "failed",
        "error": json.dumps({"stage": "validate", "message": reason, "source": source}),
        "record": "",
        "raw": text,
        "n_images": 0,
    }


def fetch_rows(rows: list[dict], policy: FetchPolicy, *, threads: int = 16) -> list[dict]:
    """Fetch every image of every pending row with at most `threads` requests in flight."""
    jobs: list[tuple[int, int, str]] = []
    for r, row in enumerate(rows):
        row["image_bytes"], row["image_errors"], row["image_digests"] = [], "[]", []
        if row["status"] == "pending":
            urls = _load(row).images
            row["image_bytes"] = [b""] * len(urls)
            row["image_digests"] = [""] * len(urls)
            row["_errors"] = [None] * len(urls)
            jobs.extend((r, i, u) for i, u in enumerate(urls))

    def one(job):
        r, i, url = job
        try:
            return r, i, fetch_image(url, policy), None
        except ImageError as e:
            return r, i, b"", {"stage": e.stage, "message": e.reason}
        except Exception as e:  # never let one image take the batch down
            return r, i, b"", {"stage": "fetch", "message": f"{type(e).__name__}: {e}"}

    if jobs:
        with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            for r, i, data, err in pool.map(one, jobs):
                rows[r]["image_bytes"][i] = data
                rows[r]["image_digests"][i] = digest(data) if data else ""
                rows[r]["_errors"][i] = err
    for row in rows:
        if "_errors" in row:
            row["image_errors"] = json.dumps(row.pop("_errors"))
    return rows


def decode_rows(rows: list[dict], *, max_pixels: int, size: int) -> list[dict]:
    """Decode fetched bytes to `size x size` RGB pixels (raw bytes); drop the encoded bytes."""
    for row in rows:
        errors = json.loads(row["image_errors"])
        pixels = []
        for i, data in enumerate(row.get("image_bytes") or []):
            if errors[i] is not None or not data:
                pixels.append(b"")
                continue
            try:
                pixels.append(decode_image(data, max_pixels=max_pixels, size=size).tobytes())
            except ImageError as e:
                errors[i] = {"stage": e.stage, "message": e.reason}
                pixels.append(b"")
            except Exception as e:
                errors[i] = {"stage": "decode", "message": f"{type(e).__name__}: {e}"}
                pixels.append(b"")
        row["pixels"] = pixels
        row["image_errors"] = json.dumps(errors)
        row.pop("image_bytes", None)
    return rows


@dataclass
class CaptionStage:
    """Captions every decoded image of each row; identical pairs are captioned once (via `cache`)."""

    captioner: CaptionModel  # models.captioner.Captioner, or anything with .caption(images, prompts)
    size: int
    cache: CaptionCache | None = None
    owner: str = "local"
    wait_s: float = 600.0
    poll_s: float = 0.05

    def __call__(self, rows: list[dict]) -> list[dict]:
        import numpy as np

        work: dict[str, tuple[Any, str]] = {}  # key -> (pixels, prompt)
        slots: list[tuple[int, int, str]] = []
        for r, row in enumerate(rows):
            n = int(row.get("n_images") or 0)
            row["captions"] = [None] * n
            row["caption_cached"] = [False] * n
            if row["status"] != "pending":
                continue
            rec = _load(row)
            errors = json.loads(row["image_errors"])
            for i in range(n):
                if errors[i] is not None:
                    continue
                prompt = caption_request(rec, i)
                key = caption_key(row["image_digests"][i], prompt)
                if key not in work:
                    arr = np.frombuffer(row["pixels"][i], dtype=np.uint8).reshape(self.size, self.size, 3)
                    work[key] = (arr, prompt)
                slots.append((r, i, key))
            row["_errors"] = errors
        results: dict[str, tuple[str | None, str | None]] = {}
        cached: set[str] = set()
        pending = list(work)
        deadline = time.monotonic() + self.wait_s
        while pending:
            if self.cache is None:
                status = {k: ("mine", None) for k in pending}
            elif time.monotonic() > deadline:  # the claimant went silent: do it ourselves
                status = {k: ("mine", None) for k in pending}
            else:
                status = self.cache.claim(pending, self.owner)
            for k in pending:
                if status[k][0] == "hit":
                    results[k] = (status[k][1], None)
                    cached.add(k)
            mine = [k for k in pending if status[k][0] == "mine"]
            if mine:
                outs = self.captioner.caption([work[k][0] for k in mine], [work[k][1] for k in mine])
                if len(outs) != len(mine):  # a captioner that drops items would leave them pending forever
                    raise RuntimeError(f"captioner returned {len(outs)} results for {len(mine)} images")
                for k, res in zip(mine, outs):
                    results[k] = (res.caption, res.error)
                if self.cache is not None:
                    self.cache.put({k: results[k][0] for k in mine if results[k][1] is None}, self.owner)
                    # failures are not cached: release them so that another actor may try again
                    failed = [k for k in mine if results[k][1] is not None]
                    if failed:
                        self.cache.release(failed, self.owner)
            pending = [k for k in pending if k not in results]
            if pending:
                time.sleep(self.poll_s)
        for r, i, key in slots:
            cap, err = results[key]
            rows[r]["captions"][i] = cap
            rows[r]["caption_cached"][i] = key in cached
            if err is not None:
                rows[r]["_errors"][i] = {"stage": "caption", "message": err}
        for row in rows:
            if "_errors" in row:
                row["image_errors"] = json.dumps(row.pop("_errors"))
            row.pop("pixels", None)
            row["captions"] = json.dumps(row["captions"])
        return rows


@dataclass
class JudgeStage:
    """One judge's vote on every caption of each row (`votes_<name>`: list of yes/no/None)."""

    judge: VoteModel  # models.judge.Judge, or anything with .vote(questions)
    name: str

    def __call__(self, rows: list[dict]) -> list[dict]:
        questions, slots = [], []
        col = f"votes_{self.name}"
        for r, row in enumerate(rows):
            caps = json.loads(row["captions"]) if row.get("captions") else []
            row[col] = [None] * len(caps)
            if row["status"] != "pending":
                continue
            rec = _load(row)
            for i, cap in enumerate(caps):
                if cap:
                    questions.append(judge_question(rec, i, cap))
                    slots.append((r, i))
        if questions:
            for (r, i), vote in zip(slots, self.judge.vote(questions)):
                rows[r][col][i] = vote.vote
        for row in rows:
            row[col] = json.dumps(row[col])
        return rows


def finalize_rows(rows: list[dict], *, judge_names: list[str], provenance: dict) -> list[dict]:
    """One output row per input row: status, per-image results, enriched input, provenance."""
    out = []
    for row in rows:
        base = {c: None for c in OUTPUT_COLUMNS}
        base.update(
            {
                k: provenance.get(k)
                for k in ("captioner_model", "captioner_revision", "judges", "prompt_version", "config_hash", "run_id")
            }
        )
        base.update({"id": row["id"], "task": row["task"] or None, "split": row["split"] or None})
        if row["status"] == "failed":
            base.update(
                {
                    "status": "failed",
                    "error": row["error"],
                    "raw": row["raw"],
                    "n_images": 0,
                    "n_failed_images": 0,
                    "n_kept": 0,
                    "image_results": "[]",
                }
            )
            out.append(base)
            continue
        try:
            out.append(_finalize_one(row, base, judge_names))
        except Exception as e:  # a bug must not lose the record
            base.update(
                {
                    "status": "failed",
                    "n_images": int(row.get("n_images") or 0),
                    "n_failed_images": 0,
                    "n_kept": 0,
                    "image_results": "[]",
                    "error": json.dumps({"stage": "internal", "message": f"{type(e).__name__}: {e}"}),
                }
            )
            out.append(base)
    return out


def _finalize_one(row: dict, base: dict, judge_names: list[str]) -> dict:
    rec = _load(row)
    n = len(rec.images)
    errors = json.loads(row.get("image_errors") or "[]") or [None] * n
    captions = json.loads(row.get("captions") or "null") or [None] * n
    cached = list(row.get("caption_cached") or [False] * n)
    votes = {name: json.loads(row.get(f"votes_{name}") or "null") or [None] * n for name in judge_names}
    kept, results = [], []
    for i in range(n):
        image_votes = {name: votes[name][i] for name in judge_names}
        keep = keep_caption(captions[i], errors[i], list(image_votes.values()))
        kept.append(keep)
        results.append(
            {
                "index": i,
                "url": rec.images[i],
                "caption": captions[i],
                "votes": image_votes,
                "kept": keep,
                "cached": bool(cached[i]) if i < len(cached) else False,
                "error": errors[i],
            }
        )
    enriched = assemble(rec, captions, kept)
    n_failed = sum(e is not None for e in errors)
    base.update(
        {
            "status": "partial" if n_failed else "ok",
            "error": json.dumps({"stage": "images", "message": f"{n_failed} of {n} image(s) failed"})
            if n_failed
            else None,
            "instruction": rec.instruction,
            "input": json.dumps(enriched.input, ensure_ascii=False),
            "options": json.dumps(enriched.options, ensure_ascii=False),
            "output": rec.output,
            "images": json.dumps(rec.images, ensure_ascii=False),
            "original_input": json.dumps(rec.input, ensure_ascii=False),
            "original_options": json.dumps(rec.options, ensure_ascii=False),
            "n_images": n,
            "n_failed_images": n_failed,
            "n_kept": sum(kept),
            "image_results": json.dumps(results, ensure_ascii=False),
            "extra": json.dumps(rec.extra, ensure_ascii=False, default=str) if rec.extra else None,
        }
    )
    return base
