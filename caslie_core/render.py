"""What a model sees for one row: captions written into its text (uniM3), then the instruction prompt.

One place for training, evaluation, `caslie prompts` and the paper's ablations. A row is either

- enrichment output (`image_results` with each image's caption and keep decision, `original_input`), or
- a raw MMECInstruct record, whose captions (when it has them) are its `caption_info`: a JSON list aligned
  with `images` (SR: history items first, then options), as in the released dataset. A raw record has no
  votes, so `kept` cannot be rendered from it: enrich it with `captioner.source: record` first.

Caption modes: `kept` (the method: captions the judges kept), `all` (every caption, no voting), `none`
(every caption rendered as rejected, the way the research code renders a rejected one: single-image and
PRP inputs keep their caption keys with null, SR items and options stay as they are).
"""

from __future__ import annotations

from .enrichment.assemble import assemble
from .errors import UsageError
from .prompts import instruction_prompt
from .records import Record, caption_list, json_or_text

CAPTION_MODES = ("kept", "all", "none")


class RenderError(ValueError):
    """A row that cannot be rendered in the asked mode: `reason` says why and what to do (no id: a count key)."""

    def __init__(self, record_id, reason: str) -> None:
        super().__init__(f"record {record_id}: {reason}")
        self.reason = reason


def _loads(value, default):
    return default if value is None else json_or_text(value)


def is_enriched(row: dict) -> bool:
    return row.get("image_results") is not None and row.get("original_input") is not None


def row_record(row: dict) -> Record:
    """The row's record with its original text (before any caption was written in)."""
    enriched = is_enriched(row)
    return Record(
        id=str(row.get("id")),
        task=row["task"],
        instruction=row.get("instruction") or "",
        input=_loads(row.get("original_input" if enriched else "input"), {}),
        options=_loads(row.get("original_options" if enriched else "options"), []),
        images=_loads(row.get("images"), []),
        output=row.get("output"),
    )


def row_captions(row: dict) -> tuple[list[str | None] | None, list[bool] | None]:
    """(captions aligned with the images, the judges' keep decisions): from `image_results` for
    enrichment output; from `caption_info` (no decisions: None) for a raw record; (None, None) without."""
    if is_enriched(row):
        results = sorted(_loads(row["image_results"], []), key=lambda r: r["index"])
        return [r.get("caption") for r in results], [bool(r.get("kept")) for r in results]
    try:
        return caption_list(row.get("caption_info")), None
    except ValueError as e:
        raise RenderError(row.get("id"), str(e)) from None


def row_text(row: dict, captions: str = "kept") -> tuple:
    """(input, options) of a row with its captions written in as `captions` says."""
    if captions not in CAPTION_MODES:
        raise UsageError(f"unknown caption mode {captions!r}; valid: {', '.join(CAPTION_MODES)}")
    record = row_record(row)
    n = record.spec.expected_images(record.input, record.options)
    if captions == "none":  # no caption is read: every one is rendered as rejected
        return _assembled(record, n, [None] * n, [False] * n)
    texts, kept = row_captions(row)
    if texts is None:
        raise RenderError(
            record.id,
            f"no captions to render with captions={captions!r} (neither image_results nor caption_info): "
            "use 'none', or enrich the records first",
        )
    if captions == "kept":
        if kept is None:
            raise RenderError(
                record.id,
                "captions='kept' needs the judges' votes, and a raw record's caption_info has none: judge "
                "them (caslie enrich with captioner.source: record), or use 'all' or 'none'",
            )
        return _assembled(record, n, texts, kept)
    return _assembled(record, n, texts, [c is not None for c in texts])


def _assembled(record: Record, n: int, captions: list, kept: list) -> tuple:
    if len(captions) != n or len(kept) != n:
        raise RenderError(
            record.id, f"{len(captions)} caption(s) for {n} image(s) (caption_info must align with images)"
        )
    enriched = assemble(record, captions, kept)
    return enriched.input, enriched.options


def row_prompt(row: dict, *, style: str, captions: str = "kept") -> str:
    """The exact prompt a model is given for this row (before tokenization)."""
    input_value, options = row_text(row, captions)
    return instruction_prompt(row.get("instruction") or "", input_value, options, style=style)


def prompt_lines(paths, *, style: str, captions: str = "kept", key: str = "RECORDS"):
    """`caslie prompts`: one `{"id", "prompt"}` per record of raw record files or enrichment output, in
    order (a row that cannot be rendered: `{"id", "prompt": null, "error"}`; a failed enrichment row: its
    status as the error). Raises `ConfigError` for paths that hold neither."""
    import fsspec
    import pyarrow.parquet as pq

    from .errors import ConfigError
    from .io.store import EVAL_COLUMNS, load_inputs

    inputs = load_inputs(paths, key=key)
    if inputs.problems:
        raise ConfigError(inputs.problems)

    def one(row: dict) -> dict:
        if (row.get("status") or "ok") == "failed":
            return {"id": row.get("id"), "prompt": None, "error": "failed in enrichment"}
        try:
            return {"id": row.get("id"), "prompt": row_prompt(row, style=style, captions=captions)}
        except RenderError as e:
            return {"id": row.get("id"), "prompt": None, "error": e.reason}

    for path in sorted(inputs.enriched):
        with fsspec.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            table = pf.read(columns=[c for c in dict.fromkeys(("status", *EVAL_COLUMNS)) if c in pf.schema_arrow.names])
        for row in table.to_pylist():
            yield one(row)
    for row in inputs.record_rows:
        yield one(row)
