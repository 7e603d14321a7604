"""`report.html` of an enrichment run: one self-contained page (pictures inlined as thumbnails) to look at.

On top, the run's counts; then, per task, a sample of records: each picture, the caption request it was
captioned with, the caption, every judge's vote, kept or not, and the record's status and error. The sample
is read from the first parts of the output until every task has its share of each kind (kept, not kept,
partial, failed), so a catalog of millions costs no more than one of thousands.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

KINDS = ("kept", "rejected", "partial", "failed")


def _kind(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return "kept" if row.get("n_kept") else "rejected"


def sample_rows(
    output: str, per_task: int, *, tasks: set[str] | None = None, max_parts: int = 50
) -> dict[str, list[dict]]:
    """Up to `per_task` rows per task, spread over the kinds, from the first `max_parts` parts (fewer once every
    task of `tasks`, the run's, has its rows)."""
    import fsspec
    import pyarrow.parquet as pq

    from ..io import store

    quota = max(1, per_task // len(KINDS))
    picked: dict[str, list[dict]] = {}
    counts: dict[tuple[str, str], int] = {}
    for n, path in enumerate(store.list_parts(output)):
        if n >= max_parts:
            break
        with fsspec.open(path, "rb") as fh:
            rows = pq.read_table(fh).to_pylist()
        for row in rows:
            task, kind = row.get("task") or "(no task)", _kind(row)
            have = picked.setdefault(task, [])
            if len(have) < per_task and counts.get((task, kind), 0) < quota:
                have.append(row)
                counts[(task, kind)] = counts.get((task, kind), 0) + 1
        # Top up with whatever kinds there are once every part so far is read (small runs lack some kinds).
        for row in rows:
            have = picked.setdefault(row.get("task") or "(no task)", [])
            if len(have) < per_task and all(r["id"] != row["id"] for r in have):
                have.append(row)
        if tasks and all(len(picked.get(t, [])) >= per_task for t in tasks):
            break
    return picked


THUMBNAIL_BUDGET_S = 20.0  # all thumbnails of one report; what is not fetched by then is shown as missing


def thumbnails(urls: list[str], policy, *, budget_s: float = THUMBNAIL_BUDGET_S) -> dict[str, str | None]:
    """{url: PNG data URI or None}, fetched in parallel once each, with no retries and a short deadline per
    picture; the whole set bounded by `budget_s` (a host that hangs costs the report at most that)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor, wait

    quick = dataclasses.replace(policy, retries=0, total_timeout=min(policy.total_timeout, 5.0))
    unique = list(dict.fromkeys(u for u in urls if u))
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="report-thumbnail")
    futures = {u: pool.submit(thumbnail, u, quick) for u in unique}
    wait(futures.values(), timeout=budget_s)
    pool.shutdown(wait=False, cancel_futures=True)
    return {u: f.result() if f.done() and not f.cancelled() else None for u, f in futures.items()}


def thumbnail(url: str, policy, *, size: int = 112) -> str | None:
    """A PNG data URI of the picture at `url`, or None when it cannot be fetched or decoded."""
    from PIL import Image

    from ..images import fetch_image

    try:
        with Image.open(io.BytesIO(fetch_image(url, policy))) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "PNG")
    except Exception:  # noqa: BLE001 - a picture that cannot be shown is reported as such, never fatal
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(row: dict, n: int) -> list[str]:
    """The caption request of each of the row's `n` pictures (the record parsed once)."""
    from ..prompts import caption_request
    from ..records import parse_record

    try:
        raw = {k: row.get(k) for k in ("id", "task", "split", "instruction", "output", "images")}
        raw.update(input=row.get("original_input"), options=row.get("original_options"))
        record = parse_record(raw)
        return [caption_request(record, i) for i in range(n)]
    except Exception as e:  # noqa: BLE001
        return [f"(no request: {e})"] * n


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
.counts td,.counts th{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}
table.records{border-collapse:collapse;width:100%} table.records td,table.records th{border:1px solid #ddd;
padding:6px;vertical-align:top;text-align:left} .kept{color:#0a6b2a;font-weight:600} .rejected{color:#9a5b00}
.status-failed,.status-partial{background:#fff3f3} .err{color:#b00020} img.thumb{border:1px solid #ccc;
max-width:112px;max-height:112px} .missing{display:inline-block;width:112px;height:60px;background:#eee;
color:#777;font-size:12px;text-align:center;padding-top:40px} .req{font-size:12px;color:#555;max-width:420px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _counts_table(summary: dict) -> str:
    head = ["records", "ok", "partial", "failed", "images", "images_per_second"]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(summary.get(k))}</td></tr>" for k in head)
    per_task = summary.get("records_per_task", {})
    rows = "".join(
        f"<tr><th>{_e(t)}</th><td>{_e(n)}</td><td>{_e(summary.get('images_per_task', {}).get(t))}</td>"
        f"<td>{_e(summary.get('captions_kept_per_task', {}).get(t))}</td><td>{_e(summary.get('kept_share', {}).get(t))}"
        "</td></tr>"
        for t, n in sorted(per_task.items())
    )
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary.get("errors_per_stage", {}).items())) or "none"
    return (
        f'<table class="counts" id="counts">{cells}</table>'
        f'<table class="counts" id="per-task"><tr><th>task</th><th>records</th><th>images</th><th>captions kept'
        f'</th><th>kept share</th></tr>{rows}</table><p id="errors">Errors per stage: {_e(errors)}</p>'
    )


def _record_rows(row: dict, thumbs: dict[str, str | None]) -> str:
    status, err = row["status"], row.get("error") or {}
    results = row.get("image_results") or []
    rec_err = f'<div class="err">{_e(err.get("stage"))}: {_e(err.get("message"))}</div>' if err else ""
    head = f'<td rowspan="{max(1, len(results))}"><b>{_e(row["id"])}</b><br>{_e(status)}{rec_err}</td>'
    if not results:
        return f'<tr class="record status-{_e(status)}" data-status="{_e(status)}">{head}<td colspan="5">no images judged</td></tr>'
    out, requests = [], _requests(row, len(results))
    for i, res in enumerate(results):
        src = thumbs.get(res.get("url"))
        pic = f'<img class="thumb" alt="image {i}" src="{src}">' if src else '<span class="missing">no picture</span>'
        votes = "<br>".join(f"{_e(v['judge'])}: {_e(v['vote'])}" for v in res.get("votes") or []) or "–"
        kept = '<span class="kept">kept</span>' if res.get("kept") else '<span class="rejected">not kept</span>'
        e = res.get("error")
        if e:
            kept += f'<div class="err">{_e(e["stage"])}: {_e(e["message"])}</div>'
        cells = (
            f'<td>{pic}</td><td class="req">{_e(requests[i])}</td><td class="caption">{_e(res.get("caption"))}'
            f'</td><td class="votes">{votes}</td><td>{kept}</td>'
        )
        out.append(
            f'<tr class="record status-{_e(status)}" data-status="{_e(status)}">{head if i == 0 else ""}{cells}</tr>'
        )
    return "".join(out)


def render(summary: dict, samples: dict[str, list[dict]], policy, *, fetch: bool = True) -> str:
    """The page; `fetch=False` shows no pictures (a run that fetched none, e.g. captions from the records)."""
    from ..tasks import get_task

    urls = [res.get("url") for rows in samples.values() for r in rows for res in r.get("image_results") or []]
    thumbs = thumbnails(urls, policy) if fetch else {}

    sections = []
    for task in sorted(samples):
        try:
            abbr = get_task(task).abbr
        except (KeyError, ValueError):
            abbr = task
        body = "".join(_record_rows(r, thumbs) for r in samples[task])
        sections.append(
            f'<section class="task" data-task="{_e(abbr)}"><h2>{_e(abbr)}: {_e(task)}</h2>'
            '<table class="records"><tr><th>record</th><th>picture</th><th>caption request</th><th>caption</th>'
            f"<th>votes</th><th>kept</th></tr>{body}</table></section>"
        )
    title = f"Enrichment report: {summary.get('run_id', '')}"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_CSS}</style></head>'
        f"<body><h1>{_e(title)}</h1><p>Output: {_e(summary.get('records_path'))}; config hash "
        f"{_e(summary.get('config_hash'))}</p>{_counts_table(summary)}{''.join(sections)}</body></html>"
    )


def write_report(output: str, summary: dict, policy, *, per_task: int = 8, fetch: bool = True) -> str:
    """Write `output/report.html`; return its path."""
    import fsspec

    tasks = set(summary.get("records_per_task") or {})
    page = render(summary, sample_rows(output, per_task, tasks=tasks), policy, fetch=fetch)
    path = output.rstrip("/") + "/report.html"
    with fsspec.open(path, "wt", encoding="utf-8") as fh:
        fh.write(page)
    return path


def attach_report(cfg, summary: dict, *, warn) -> None:
    """Write the job's report.html when `output.report_per_task` asks for one and name it in `summary`; a page
    to look at, so a report that cannot be written is a warning (`warn`), never a failed job."""
    if not cfg.output.report_per_task:
        return
    try:
        summary["report"] = write_report(
            cfg.output.path,
            summary,
            cfg.fetch.policy(),
            per_task=cfg.output.report_per_task,
            fetch=cfg.captioner.source == "model",  # captions from the records: no picture was fetched
        )
    except Exception as e:  # noqa: BLE001
        summary.pop("report", None)
        warn(f"[enrich] report.html not written: {type(e).__name__}: {e}")
