"""Modality-unified assembly (uniM3): write kept captions into a record's text input."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..records import Record

SINGLE_KEY = "product information extracted from image"
PRP_KEYS = ("product 1 information extracted from image", "product 2 information extracted from image")


@dataclass
class EnrichedText:
    input: dict | list
    options: list[str]


def assemble(record: Record, captions: list[str | None], kept: list[bool]) -> EnrichedText:
    """Build the enriched input and options.

    Single-image tasks gain `SINGLE_KEY` (the caption, or null when rejected or missing); PRP gains
    one key per product; SR appends a kept caption after a space to its history item or option.
    """
    spec = record.spec
    n = spec.expected_images(record.input, record.options)
    if len(captions) != n or len(kept) != n:
        raise ValueError(
            f"record {record.id} ({spec.abbr}) has {n} image(s), got {len(captions)} caption(s) and "
            f"{len(kept)} keep flag(s)"
        )
    use = [c if (k and c) else None for c, k in zip(captions, kept)]
    if spec.layout == "single":
        inp = dict(record.input)
        inp[SINGLE_KEY] = use[0]
        return EnrichedText(inp, list(record.options))
    if spec.layout == "pair":
        inp = dict(record.input)
        inp[PRP_KEYS[0]], inp[PRP_KEYS[1]] = use
        return EnrichedText(inp, list(record.options))
    history = copy.copy(record.input)
    h = len(history)
    new_history = [item if use[i] is None else f"{item} {use[i]}" for i, item in enumerate(history)]
    new_options = [opt if use[h + j] is None else f"{opt} {use[h + j]}" for j, opt in enumerate(record.options)]
    return EnrichedText(new_history, new_options)
